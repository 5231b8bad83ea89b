"""A misconfigured multi-host launch fails in seconds, in one line (train.py).

Only localhost ports with no peer are used: a process 0 whose second process
never comes, a process 1 whose coordinator does not exist, a process 0 stopped
by Ctrl-C (SIGINT to our own child) while it waits, and an address without a port.
"""

import os
import socket
import subprocess
import sys
import time

import portpicker

from tests import processes

REPO = processes.ROOT
TRAIN = [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "default.py:runlocal")]


def _launch(tmp_path, name, *flags):
  return subprocess.Popen(TRAIN + ["--workdir", str(tmp_path / name), *flags], cwd=REPO,
                          env=processes.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _listening(port):
  with socket.socket() as s:
    return s.connect_ex(("localhost", port)) == 0


def test_no_peer_times_out_ctrl_c_stops_and_bad_address_is_one_line(tmp_path):
  ports = [portpicker.pick_unused_port() for _ in range(3)]
  procs = {
      "process 0 of 2": _launch(tmp_path, "a", f"--coordinator_address=localhost:{ports[0]}",
                                "--num_processes=2", "--process_id=0",
                                "--distributed_timeout=2"),
      "process 1 of 2": _launch(tmp_path, "b", f"--coordinator_address=localhost:{ports[1]}",
                                "--num_processes=2", "--process_id=1",
                                "--distributed_timeout=2"),
      "interrupted": _launch(tmp_path, "c", f"--coordinator_address=localhost:{ports[2]}",
                             "--num_processes=2", "--process_id=0",
                             "--distributed_timeout=300"),
      "no port": _launch(tmp_path, "d", "--coordinator_address=localhost",
                         "--num_processes=2", "--process_id=0"),
  }
  # Process 0 serves the coordinator on its port once it is waiting for its peer.
  waiting = procs["interrupted"]
  deadline = time.time() + 120
  while not _listening(ports[2]):
    assert waiting.poll() is None and time.time() < deadline, waiting.communicate()
    time.sleep(0.2)
  t0 = time.time()
  waiting.send_signal(2)  # SIGINT (Ctrl-C), to our own child only
  out = {name: p.communicate(timeout=120) for name, p in procs.items()}
  assert time.time() - t0 < 20  # Ctrl-C did not wait for the 300 s
  assert waiting.returncode == 130, out["interrupted"]
  assert out["interrupted"][1].strip() == "interrupted"
  for name, port in (("process 0 of 2", ports[0]), ("process 1 of 2", ports[1])):
    assert procs[name].returncode == 2, out[name]
    line, = out[name][1].strip().splitlines()
    assert line.startswith("error: the multi-host start-up did not complete within 2 s")
    assert f"({name}, coordinator localhost:{port})" in line
    assert "--distributed_timeout" in line
  assert procs["no port"].returncode == 2
  line, = out["no port"][1].strip().splitlines()
  assert "--coordinator_address='localhost' must be host:port" in line
  assert not any(os.path.exists(tmp_path / n) for n in "abcd")  # nothing written
