#!/usr/bin/env python3
"""Turn the raw measurements of benches/run.sh into the Markdown report.

  report.py RAW.jsonl META.json [LOGS.txt]

RAW.jsonl has one JSON object per measurement (see run.sh); META.json describes the
machine and the settings. Prints Markdown: the summary table (medians over the rounds,
ratios to nginx and to the upstream alone), every round, and whatever went wrong.
"""
import json
import statistics
import sys

TARGETS = ["upstream", "nginx", "apache", "quadrige"]
NAMES = {"upstream": "upstream alone", "nginx": "nginx", "apache": "Apache",
         "quadrige": "quadrige-proxy"}


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, kind):
    if value is None:
        return "—"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:.2f}"
    if kind == "gbs":
        return f"{value:.2f}"
    if kind == "mib":
        return f"{value:.1f}"
    if kind in ("us", "n1"):
        return f"{value:.1f}"
    if kind == "s":
        return f"{value:.2f}"
    if kind == "pct":
        return f"{value:.0f} %"
    return str(value)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def main():
    raw = load(sys.argv[1])
    with open(sys.argv[2]) as f:
        meta = json.load(f)
    logs = open(sys.argv[3]).read().strip() if len(sys.argv) > 3 else ""

    def med(test, target, key):
        return median([r.get(key) for r in raw
                       if r["test"] == test and r["target"] == target and r.get("ok", True)])

    def one(test, target, key):
        rows = [r for r in raw if r["test"] == test and r["target"] == target]
        return rows[-1].get(key) if rows else None

    rows = []  # (label, kind, {target: value}, lower_is_better)
    def busy(test, t):
        pair = cpu_pair(med(test, t, "cpu_pct"), med(test, t, "upstream_cpu_pct"), t)
        core = med(test, t, "server_core_busy_pct")
        return pair if core is None else f"{pair} (core: {core:.0f} %)"

    for test, label in (("get", "small GET"), ("post", "small POST"),
                        ("close", "new connection per request (GET, `Connection: close`)")):
        rows.append((f"{label}: requests/s", "int",
                     {t: med(test, t, "rps") for t in TARGETS}))
        if test != "close":
            rows.append((f"{label}: p50 latency (ms)", "ms",
                         {t: ms(med(test, t, "p50_us")) for t in TARGETS}))
        rows.append((f"{label}: p99 latency (ms)", "ms",
                     {t: ms(med(test, t, "p99_us")) for t in TARGETS}))
        rows.append((f"{label}: CPU per request (µs; proxy, or upstream alone)", "us",
                     {t: med(test, t, "cpu_us_per_req") for t in TARGETS}))
        rows.append((f"{label}: of which in the kernel (µs; system time: the same system "
                     f"calls cost every proxy the same)", "us",
                     {t: med(test, t, "kernel_us_per_req") for t in TARGETS}))
        rows.append((f"{label}: upstream connections opened per 1,000 requests", "n1",
                     {t: median([per_k(r) for r in raw if r["test"] == test
                                 and r["target"] == t and r.get("ok", True)])
                      for t in TARGETS}))
        rows.append((f"{label}: CPU used, % of a core (proxy / upstream; the server core's "
                     f"total busy time, other work included)", "text",
                     {t: busy(test, t) for t in TARGETS}))
    # New TLS connections ("upstream alone": its own TLS listener answers /small).
    rows.append(("TLS new connection: time to first byte p50 (ms; TCP connect and TLS 1.3 "
                 "handshake included)", "ms",
                 {t: ms(med("tls", t, "ttfb_p50_us")) for t in TARGETS}))
    rows.append(("TLS new connection: time to first byte p99 (ms)", "ms",
                 {t: ms(med("tls", t, "ttfb_p99_us")) for t in TARGETS}))
    rows.append(("TLS new connection: handshake done, client side, p50 (ms; TCP connect "
                 "included)", "ms",
                 {t: ms(med("tls", t, "hs_p50_us")) for t in TARGETS}))
    tls_conc = meta.get("tls_concurrency", 0)
    if tls_conc:
        rows.append((f"TLS new connections/s ({tls_conc} client processes, one request each; "
                      f"bounded by the client when its core is full, see below)",
                     "int", {t: med("tls_rate", t, "rate") for t in TARGETS}))
        rows.append(("TLS new connection: CPU per connection (µs; proxy, or upstream alone)", "us",
                     {t: med("tls_rate", t, "cpu_us_per_conn") for t in TARGETS}))
        rows.append(("TLS new connections: CPU used, % of a core (proxy / upstream; the "
                     "server core's total busy time, other work included)", "text",
                     {t: busy("tls_rate", t) for t in TARGETS}))
    rows.append(("1 GiB download (GB/s)", "gbs", {t: med("download", t, "gbps") for t in TARGETS}))
    rows.append(("1 GiB download: CPU seconds (proxy, or upstream alone)", "s",
                 {t: med("download", t, "cpu_s") for t in TARGETS}))
    rows.append(("1 GiB upload (GB/s)", "gbs", {t: med("upload", t, "gbps") for t in TARGETS}))
    rows.append(("1 GiB upload: CPU seconds (proxy, or upstream alone)", "s",
                 {t: med("upload", t, "cpu_s") for t in TARGETS}))
    slow = meta["slow_clients"]
    rows.append((f"{slow} slow readers at {meta['slow_rate']}/s: peak RSS (MiB)", "mib",
                 {t: kib_mib(one("slow", t, "peak_kib")) for t in TARGETS if t != "upstream"}))
    rows.append((f"{slow} slow readers: peak PSS (MiB; shared pages split between processes)", "mib",
                 {t: kib_mib(one("slow", t, "peak_pss_kib")) for t in TARGETS if t != "upstream"}))
    rows.append((f"{slow} slow readers: streams still flowing at the end", "text",
                 {t: flowing(raw, t) for t in TARGETS if t != "upstream"}))
    idle = meta["idle_conns"]
    rows.append(("RSS of a fresh proxy after a few requests (MiB)", "mib",
                 {t: kib_mib(one("idle", t, "base_kib")) for t in TARGETS if t != "upstream"}))
    rows.append((f"{idle:,} idle keep-alive connections: RSS increase (MiB)", "mib",
                 {t: kib_mib(delta(one("idle", t, "after_kib"), one("idle", t, "base_kib")))
                  for t in TARGETS if t != "upstream"}))
    rows.append((f"{idle:,} idle keep-alive connections: PSS increase (MiB)", "mib",
                 {t: kib_mib(delta(one("idle", t, "after_pss_kib"), one("idle", t, "base_pss_kib")))
                  for t in TARGETS if t != "upstream"}))
    rows.append((f"{idle:,} idle keep-alive connections: held / opened", "text",
                 {t: held(raw, t) for t in TARGETS if t != "upstream"}))

    out = []
    w = out.append
    w(f"# quadrige-proxy benchmark — {meta['date']}")
    w("")
    w(f"Machine: {meta['cpu_model']}, `nproc` = {meta['nproc']}, {meta['mem']}, "
      f"{meta['os']}, kernel {meta['kernel']}. Load average at start {meta['load_start']}, "
      f"at end {meta['load_end']} (other work on the machine makes the figures noisy).")
    w("")
    w(f"{meta['qp_version']}; {meta['nginx_version']}; {meta['apache_version']}; "
      f"{meta['wrk_version']}; {meta['curl_version']}.")
    w("")
    w(f"Cores: the load generators (wrk, curl, the Python clients) are pinned to CPU "
      f"{meta['client_cpu']}; the upstream and the proxy under test share CPU "
      f"{meta['server_cpu']}"
      f"{'' if any(c in str(meta['server_cpu']) for c in ',-') else ' (one core for the whole server side, as in issue 5)'}. nginx: 1 "
      f"worker process; Apache: mpm_event, 1 child process with {meta['apache_threads']} "
      f"threads; quadrige-proxy: {meta['qp_workers']} worker thread(s) "
      f"(`workers`; {meta['qp_threads_seen']} threads in the process). Upstream: "
      f"nginx, 1 worker. Access logs off everywhere.")
    w("")
    w(f"{meta['rounds']} rounds, targets alternated within each round "
      f"(upstream, nginx, Apache, quadrige-proxy); medians. wrk: 1 thread, "
      f"{meta['conns']} keep-alive connections, {meta['duration']} s per run. Ratios: "
      f"higher is better for requests/s, connections/s and GB/s, lower is better for "
      f"latency, CPU and memory.")
    w("")
    if any(r["test"] in ("tls", "tls_rate") for r in raw):
        neg = meta.get("tls_negotiated", {})
        seen = "; ".join(f"{NAMES[t]}: {neg[t]}" for t in TARGETS if neg.get(t))
        w(f"TLS: each target's TLS listener (the proxies forward `/small` to the upstream; "
          f"the upstream alone answers it on a TLS listener of its own) with the run's "
          f"self-signed certificate ({meta.get('tls_cert', '?')}). The client "
          f"({meta.get('python_ssl', 'Python')}) asks for TLS 1.3 and ALPN http/1.1, never "
          f"resumes a session, and makes a new TCP connection and a full handshake per "
          f"request: {meta.get('tls_requests', '?')} sequential ones per proxy and round "
          f"(time to first byte from the connect), then {tls_conc} processes for "
          f"{meta.get('tls_rate_secs', '?')} s (connections/s). Negotiated with "
          f"`openssl s_client -tls1_3` ({meta.get('openssl_version', 'OpenSSL')}): "
          f"{seen or 'not probed'}.")
        w("")
    head = ["measure"] + [NAMES[t] for t in TARGETS] + [
        "Apache ÷ nginx", "quadrige ÷ nginx", "quadrige ÷ Apache",
        "nginx ÷ upstream", "Apache ÷ upstream", "quadrige ÷ upstream"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for label, kind, vals in rows:
        cells = [label] + [fmt(vals.get(t), kind) if t in vals else "—" for t in TARGETS]
        if kind in ("text", "n1"):
            cells += ["—"] * 6
        else:
            u, n, a, q = (vals.get(t) for t in TARGETS)
            cells += [ratio(a, n), ratio(q, n), ratio(q, a), ratio(n, u), ratio(a, u), ratio(q, u)]
        w("| " + " | ".join(cells) + " |")
    w("")
    # One client core cannot out-handshake one server core (a TLS client does about as much
    # work per handshake as the server): say when the connection rate measured the client.
    client_full = {t: med("tls_rate", t, "client_core_busy_pct") for t in TARGETS}
    client_full = {t: v for t, v in client_full.items() if v is not None and v >= 90}
    if client_full:
        w("TLS new connections/s: the client's core was "
          + ", ".join(f"{v:.0f} % busy for {NAMES[t]}" for t, v in client_full.items())
          + ": those rates are what the client could drive, not what the server could take. "
          "Compare the CPU per connection instead (the server's own CPU time divided by "
          "the connections), and the time to first byte.")
        w("")

    # Issue 5's targets, checked on this run's medians.
    def get(test, t, key):
        return med(test, t, key)

    checks = []

    def check(label, value, limit, higher_is_better=True):
        if value is None or limit is None:
            checks.append(f"| {label} | — | not measured |")
            return
        ok = value >= limit if higher_is_better else value <= limit
        num = (lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.2f}")
        checks.append(f"| {label} | {num(value)} vs {num(limit)} | {'met' if ok else 'not met'} |")

    for test, label in (("get", "GET"), ("post", "POST")):
        q, n, a = get(test, "quadrige", "rps"), get(test, "nginx", "rps"), get(test, "apache", "rps")
        check(f"small {label}: requests/s ≥ 1.2 × nginx", q, None if n is None else 1.2 * n)
        check(f"small {label}: p99 ≤ nginx's (ms)", ms(get(test, "quadrige", "p99_us")),
              ms(get(test, "nginx", "p99_us")), higher_is_better=False)
        check(f"small {label}: requests/s ≥ 4 × Apache", q, None if a is None else 4 * a)
    for test in ("download", "upload"):
        q, n, u = (get(test, t, "gbps") for t in ("quadrige", "nginx", "upstream"))
        check(f"1 GiB {test}: GB/s ≥ 2 × nginx", q, None if n is None else 2 * n)
        check(f"1 GiB {test}: GB/s ≥ 0.8 × upstream alone", q, None if u is None else 0.8 * u)
    check("TLS new connection: time to first byte p50 ≤ nginx's (ms; informative, issue 5 "
          "names the measure, not a threshold)", ms(get("tls", "quadrige", "ttfb_p50_us")),
          ms(get("tls", "nginx", "ttfb_p50_us")), higher_is_better=False)
    check(f"{slow} slow readers: peak RSS ≤ 24 MiB", kib_mib(one("slow", "quadrige", "peak_kib")),
          24.0, higher_is_better=False)
    check(f"{idle:,} idle connections: RSS increase ≤ 48 MiB",
          kib_mib(delta(one("idle", "quadrige", "after_kib"), one("idle", "quadrige", "base_kib"))),
          48.0, higher_is_better=False)
    w("## Issue 5's targets on this run (quadrige-proxy)")
    w("")
    w("| target | measured vs threshold | |")
    w("|---|---|---|")
    for line in checks:
        w(line)
    w("")

    w("## Every round")
    w("")
    w("| test | target | round | result | errors | CPU (proxy / upstream, % of a core) |")
    w("|---|---|---|---|---|---|")
    for r in raw:
        if r["test"] in ("get", "post", "close"):
            if r.get("rps") is None:
                res = "no result"
            else:
                res = (f"{r['rps']:,.0f} req/s, p50 {ms(r['p50_us']):.2f} ms, "
                       f"p99 {ms(r['p99_us']):.2f} ms ({r['requests']:,} requests; "
                       f"{r['cpu_us_per_req']:.1f} µs CPU each; upstream: "
                       f"{r['upstream_conns']:,} connections, {r['upstream_reqs']:,} requests)")
        elif r["test"] == "tls":
            if r.get("ttfb_p50_us") is None:
                res = "no result"
            else:
                res = (f"time to first byte p50 {ms(r['ttfb_p50_us']):.2f} ms, p90 "
                       f"{ms(r['ttfb_p90_us']):.2f} ms, p99 {ms(r['ttfb_p99_us']):.2f} ms, max "
                       f"{ms(r['ttfb_max_us']):.2f} ms; handshake p50 {ms(r['hs_p50_us']):.2f} ms, "
                       f"p99 {ms(r['hs_p99_us']):.2f} ms ({r['requests']:,}/{r['count']:,} new "
                       f"connections in {r['secs']:.2f} s; {r['version']} {r['cipher']} "
                       f"{r['alpn']}, {r['resumed']} resumed; upstream: {r['upstream_conns']:,} "
                       f"connections, {r['upstream_reqs']:,} requests)")
        elif r["test"] == "tls_rate":
            if r.get("rate") is None:
                res = "no result"
            else:
                res = (f"{r['rate']:,.0f} new TLS connections/s ({r['conns']:,} in "
                       f"{r['secs']:.2f} s; {r['cpu_us_per_conn']:.1f} µs CPU each)")
        elif r["test"] in ("download", "upload"):
            res = (f"{r['gbps']:.2f} GB/s ({r['bytes']:,} bytes in {r['secs']:.2f} s, "
                   f"HTTP {r['http']}, curl exit {r['curl_rc']}; {r['cpu_s']:.2f} s CPU)")
        elif r["test"] == "slow":
            res = (f"peak {kib_mib(r['peak_kib']):.1f} MiB RSS, {kib_mib(r['peak_pss_kib']):.1f} MiB PSS (sum of VmHWM "
                   f"{kib_mib(r['hwm_kib']):.1f}), start {kib_mib(r['base_kib']):.1f} MiB; "
                   f"{r['clients_ok']}/{r['clients']} streams flowing, "
                   f"{r['mbps_per_client']:.2f} MB/s per client")
        elif r["test"] == "idle":
            res = (f"RSS {kib_mib(r['base_kib']):.1f} → {kib_mib(r['after_kib']):.1f} MiB, "
                   f"PSS {kib_mib(r['base_pss_kib']):.1f} → {kib_mib(r['after_pss_kib']):.1f} MiB; "
                   f"opened {r['opened']:,}, held {r['held']:,} after the hold, "
                   f"open took {r['open_secs']} s; upstream: {r['upstream_conns']:,} "
                   f"connections, {r['upstream_reqs']:,} requests")
        else:
            res = json.dumps(r)
        cpu = "—"
        if r.get("cpu_pct") is not None:
            cpu = cpu_pair(r.get("cpu_pct"), r.get("upstream_cpu_pct"), r["target"])
        if r.get("server_core_busy_pct") is not None:
            cpu += (f"; cores busy: server {r['server_core_busy_pct']:.0f} %, "
                    f"clients {r['client_core_busy_pct']:.0f} %")
        w(f"| {r['test']} | {NAMES[r['target']]} | {r.get('round', 1)} | {res} | "
          f"{r.get('errors', 0)}{' ' + r['error_detail'] if r.get('error_detail') else ''} | {cpu} |")
    w("")

    problems = [r for r in raw if r.get("errors") or not r.get("ok", True)]
    # A proxy that opens an upstream connection for most keep-alive requests is not
    # pooling: its figures are then about connection set-up, not proxying.
    no_pool = []
    for t in TARGETS[1:]:
        for test in ("get", "post", "tls"):
            k = median([per_k(r) for r in raw if r["test"] == test and r["target"] == t])
            if k is not None and k > 100:
                what = ("requests on new TLS connections" if test == "tls"
                        else f"keep-alive requests on small {test.upper()}")
                no_pool.append(f"- {NAMES[t]} opened {k:.0f} upstream connections per 1,000 "
                               f"{what} (a pooling proxy opens ~0): its upstream connections "
                               f"are not reused.")
    w("## Problems seen")
    w("")
    for line in no_pool:
        w(line)
    if not problems and not logs and not no_pool:
        w("None: no client error, no failed transfer, nothing in the servers' error logs.")
    elif not problems and not logs:
        w("- No client error, no failed transfer, nothing in the servers' error logs.")
    for r in problems:
        w(f"- {r['test']} through {NAMES[r['target']]} (round {r.get('round', 1)}): "
          f"{r.get('errors', 0)} errors{' — ' + r['error_detail'] if r.get('error_detail') else ''}"
          f"{'' if r.get('ok', True) else ' (not counted in the medians)'}")
    if logs:
        w("")
        w("Server error logs (line counts and last lines):")
        w("")
        w("```")
        w(logs)
        w("```")
    w("")
    print("\n".join(out))


def per_k(r):
    if r.get("upstream_reqs") is None or r.get("upstream_conns") is None or r["upstream_reqs"] <= 0:
        return None
    return r["upstream_conns"] / r["upstream_reqs"] * 1000


def ms(us):
    return None if us is None else us / 1000.0


def kib_mib(kib):
    return None if kib is None else kib / 1024.0


def delta(a, b):
    return None if a is None or b is None else a - b


def cpu_pair(proxy, upstream, target):
    if proxy is None:
        return "—"
    if target == "upstream":
        return f"{proxy:.0f} %"
    return f"{proxy:.0f} % / {upstream:.0f} %" if upstream is not None else f"{proxy:.0f} %"


def flowing(raw, target):
    rows = [r for r in raw if r["test"] == "slow" and r["target"] == target]
    return f"{rows[-1]['clients_ok']}/{rows[-1]['clients']}" if rows else "—"


def held(raw, target):
    rows = [r for r in raw if r["test"] == "idle" and r["target"] == target]
    return f"{rows[-1]['held']:,}/{rows[-1]['opened']:,}" if rows else "—"


if __name__ == "__main__":
    main()
