-- wrk script of bench/bench_serve.py: GET requests for users drawn at random (seeded
-- per thread) from a file of user IDs, one per line, and a JSON summary at the end.
--   wrk -t T -c C -d D -s bench/serve_wrk.lua URL -- USERS_FILE PATH_FORMAT [SEED]
-- PATH_FORMAT has one %s for the user ID, e.g. "/recommend?user=%s&k=10".
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
  table.insert(threads, thread)
end

local users = {}
local fmt

function init(args)
  for line in io.lines(args[1]) do
    users[#users + 1] = line
  end
  fmt = args[2]
  math.randomseed(tonumber(args[3] or "1") * 1000 + thread_id)
end

function request()
  return wrk.format("GET", string.format(fmt, users[math.random(#users)]))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
