#!/usr/bin/env python3
"""Memory and CPU of a server's process tree, from /proc (used by benches/run.sh).

  procstat.py rss PID                 RSS of PID and its descendants, in KiB (one line)
  procstat.py mem PID                 rss_kib=N pss_kib=N of the tree
  procstat.py cpu PID                 utime+stime of the tree, in clock ticks
  procstat.py cpu-kernel PID          stime of the tree (time spent in the kernel), in ticks
  procstat.py threads PID             threads of the tree
  procstat.py sample PID SECS STEP    sample the tree's RSS every STEP s for SECS s (or
                                      until the file named by $STOP_FILE exists), then
                                      print: peak_kib=N last_kib=N hwm_kib=N
                                      peak_pss_kib=N samples=N

A multi-process server (nginx master + worker, Apache parent + child) is measured as the
sum over its processes; VmHWM is per process, so hwm_kib is the sum of each one's peak.
"""
import os
import sys
import time


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree(root):
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(pids):
    return sum(status_kib(p, "VmRSS") for p in pids)


def pss(pids):
    """Proportional set size: shared pages split between the processes sharing them, so
    a master and its worker do not count their common libraries twice."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def cpu_ticks(pids, fields_wanted=(11, 12)):
    """utime (field 11 after the command name) and stime (12), summed over `pids`."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += sum(int(fields[i]) for i in fields_wanted)
    return total


def main():
    cmd, root = sys.argv[1], int(sys.argv[2])
    if cmd == "rss":
        print(rss(tree(root)))
    elif cmd == "mem":
        pids = tree(root)
        print(f"rss_kib={rss(pids)} pss_kib={pss(pids)}")
    elif cmd == "cpu":
        print(cpu_ticks(tree(root)))
    elif cmd == "cpu-kernel":
        print(cpu_ticks(tree(root), fields_wanted=(12,)))
    elif cmd == "threads":
        print(sum(status_kib(p, "Threads") for p in tree(root)))
    elif cmd == "sample":
        secs, step = float(sys.argv[3]), float(sys.argv[4])
        stop_file = os.environ.get("STOP_FILE")
        deadline = time.monotonic() + secs
        peak = last = peak_pss = samples = 0
        pids = tree(root)
        refresh = 0
        while time.monotonic() < deadline:
            if stop_file and os.path.exists(stop_file):
                break
            refresh += 1
            if refresh % 10 == 0:  # Apache or nginx may start new children
                pids = tree(root)
            last = rss(pids)
            peak = max(peak, last)
            peak_pss = max(peak_pss, pss(pids))
            samples += 1
            time.sleep(step)
        hwm = sum(status_kib(p, "VmHWM") for p in tree(root))
        print(f"peak_kib={peak} last_kib={last} hwm_kib={hwm} peak_pss_kib={peak_pss} samples={samples}")
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
