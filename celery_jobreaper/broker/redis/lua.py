"""The Lua script that removes listed messages from one Redis list, checked by value.

Redis lists have no delete-by-index: the only way to take an entry out of the middle is
``LREM``, which compares entries one by one from an end (about 70 ns each for 1 kB messages,
so about 35 ms to reach the middle of a million-entry list). ``LINDEX``/``LSET`` skip whole
list nodes and cost far less. So the script removes (overwrites with a tombstone, then one
``LREM`` per end) only entries within *reach* of an end of the list, and bounds its own time:

* ``reach`` (entries) bounds every walk entry by entry: the ``LREM`` of the tombstones (one
  from each end) and the ``LPOS`` search (from the end nearer to where the target was
  expected), used only when the target is not near its expected index. The caller adapts
  it from the walking speed the script reports, so that a walk stays within a few
  milliseconds.
* ``budget`` (microseconds) bounds the loop: no target is started once it is spent (the
  first always is); the reply says how many were done and the caller sends the rest again.

A target deeper than ``reach`` is *neutralized* in place instead: overwritten with the
caller's copy of the same message whose ``expires`` is in the past, so that any Celery worker
that receives it discards it as expired without running it (as it discards a revoked task).
It keeps its place, so nothing else moves; a later sweep removes it once it comes within
reach.

KEYS[1] is the list. ARGV: tombstone (unique to the sweep), search window, first guess of the
drift (how far entries moved towards the tail since their expected index was worked out),
reach, budget, then triples of (expected index counted from the tail, exact value,
neutralized value, or "" when it has none, or "=" when it is already neutralized). The drift
found for one target is the guess for the next. Returns {drift, microseconds spent,
microseconds in the LREMs, entries they walked, flag_1, ...} with one flag per target
handled: 1 removed, 2 neutralized, 3 found too deep and left (no neutralized value), 4 found
too deep and already neutralized, 0 not found (consumed meanwhile).
"""

from __future__ import annotations

REMOVE_LUA = """
local key = KEYS[1]
local tomb = ARGV[1]
local window = tonumber(ARGV[2])
local drift = tonumber(ARGV[3])
local reach = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local started = clock()
local out = {0, 0, 0, 0}
local len = redis.call('LLEN', key)
local tail_count, tail_far = 0, 0
local head_count, head_far = 0, 0
for i = 6, #ARGV, 3 do
  if i > 6 and clock() - started > budget then break end
  local hint = tonumber(ARGV[i])
  local value = ARGV[i + 1]
  local neutral = ARGV[i + 2]
  local at = hint + drift
  local pos = false
  if at < 0 and at >= -len and redis.call('LINDEX', key, at) == value then
    pos = at
  else
    local lo = at - window
    local hi = at + window
    if hi > -1 then hi = -1 end
    if lo < -len then lo = -len end
    if lo <= hi then
      local near = redis.call('LRANGE', key, lo, hi)
      for j = 1, #near do
        if near[j] == value then
          pos = lo + j - 1
          break
        end
      end
    end
    if not pos and len > 0 then
      local rank = -1
      if -at > len / 2 then rank = 1 end
      local found = redis.call('LPOS', key, value, 'RANK', rank, 'MAXLEN', reach)
      if found then pos = found - len end
    end
    if pos then drift = pos - hint end
  end
  if not pos then
    out[#out + 1] = 0
  else
    local from_tail = -pos
    local from_head = len + pos + 1
    if from_tail <= reach or from_head <= reach then
      redis.call('LSET', key, pos, tomb)
      if from_tail <= from_head then
        tail_count = tail_count + 1
        if from_tail > tail_far then tail_far = from_tail end
      else
        head_count = head_count + 1
        if from_head > head_far then head_far = from_head end
      end
      out[#out + 1] = 1
    elseif neutral == '=' then
      out[#out + 1] = 4
    elseif neutral ~= '' then
      redis.call('LSET', key, pos, neutral)
      out[#out + 1] = 2
    else
      out[#out + 1] = 3
    end
  end
end
local walk_started = clock()
if tail_count > 0 then redis.call('LREM', key, -tail_count, tomb) end
if head_count > 0 then redis.call('LREM', key, head_count, tomb) end
local finished = clock()
out[1] = drift
out[2] = finished - started
out[3] = finished - walk_started
out[4] = tail_far + head_far
return out
"""
