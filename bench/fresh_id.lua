-- wrk script for bench/perf.py: POST one body again and again, each time with a fresh message id,
-- so the service's dedupe never short-circuits a request.
--
--   wrk -t1 -c16 -d5s -s bench/fresh_id.lua URL -- BODY_FILE PLACEHOLDER_ID RUN_TAG TOKEN
--
-- BODY_FILE holds the message with PLACEHOLDER_ID as its id (once); RUN_TAG is 8 hex digits that
-- make this run's ids differ from every other run's. Ids are UUID-shaped
-- (RUN_TAG-tttt-4000-8000-nnnnnnnnnnnn), so the envelope check accepts them.
-- done() prints one JSON line with the counts and exact latency percentiles (microseconds).

local prefix, suffix, tag, headers
local counter = 0
local threads = 0

-- Runs in the main state once per thread: each thread's ids get a part of their own.
function setup(thread)
  threads = threads + 1
  thread:set("thread_tag", string.format("%04x", threads))
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local body = file:read("*a")
  file:close()
  local placeholder = args[2]
  local s, e = body:find(placeholder, 1, true)
  assert(s, "placeholder id not found in body")
  prefix = body:sub(1, s - 1)
  suffix = body:sub(e + 1)
  tag = args[3]
  headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Token " .. args[4] }
end

-- With WRK_PACE_MS set, each connection waits that long between an answer and its next request:
-- a steady rate below saturation (16 connections pausing 7 ms: about 2,000 requests/s).
local pace = tonumber(os.getenv("WRK_PACE_MS") or "")
if pace then
  function delay()
    return pace
  end
end

function request()
  counter = counter + 1
  local id = string.format("%s-%s-4000-8000-%012d", tag, thread_tag, counter)
  return wrk.format("POST", nil, headers, prefix .. id .. suffix)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
      .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean
  ))
end
