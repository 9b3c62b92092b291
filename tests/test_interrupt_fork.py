"""Ctrl-C reaches every process of the terminal's process group, forked DataLoader workers included."""

import os
import signal
import time

from cli import interrupt


def test_a_forked_worker_stops_quietly_on_ctrl_c_and_only_the_command_reports(monkeypatch):
    exits = []
    monkeypatch.setattr(interrupt, "_announced", False)
    with interrupt.interruptible(lambda: exits.append("before exit")):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: what it prints goes to the pipe; 7 when Ctrl-C stopped it as KeyboardInterrupt
            os.dup2(write, 2)
            try:
                time.sleep(10)
            except KeyboardInterrupt:
                time.sleep(interrupt.GRACE_S + 0.5)  # long enough for a grace timer to fire, had it started one
                os._exit(7)
            os._exit(1)
        os.close(write)
        time.sleep(0.3)
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        printed = os.read(read, 4096).decode()
        os.close(read)
    assert os.waitstatus_to_exitcode(status) == 7  # not 130: the worker's grace timer never ended it
    assert interrupt.MESSAGE not in printed and printed == ""
    assert not interrupt._announced and exits == []  # the command has not been interrupted
