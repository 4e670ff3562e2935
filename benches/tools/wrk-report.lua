-- wrk script for benches/run.sh.
--   WRK_METHOD=POST  sends a small JSON body (a GeoNature-like API call) instead of a GET.
-- At the end it prints one machine-readable line, WRKRESULT key=value ..., that run.sh
-- parses: request count, duration, every error class wrk counts, latency percentiles (µs).
local method = os.getenv("WRK_METHOD") or "GET"
if method == "POST" then
  wrk.method = "POST"
  wrk.body = '{"operationName":"getObservations","variables":{"id_dataset":42,"limit":50,"fields":["id","cd_nom","date_min"]}}'
  wrk.headers["Content-Type"] = "application/json"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT requests=%d duration_us=%d bytes=%d err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
