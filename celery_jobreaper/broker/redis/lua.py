"""The Lua script that removes listed messages from one Redis list, checked by value."""

from __future__ import annotations

# Removes listed messages from one list, atomically. KEYS[1] is the list. ARGV[1] is a
# tombstone unique to the sweep, ARGV[2] the search window, ARGV[3] a first guess of the
# drift (how far entries moved towards the tail since their expected index was worked out),
# then pairs of (expected index counted from the tail, exact value). The drift found for one
# message is the guess for the next. Each message is checked by value where it should be (or
# found nearby, else by LPOS), overwritten with the tombstone, and all tombstones are removed
# with one LREM from the nearer end before the script returns, so no client ever sees one.
# Returns {drift, found_1, found_2, ...} with found_i 1 when the i-th message was removed.
REMOVE_LUA = """
local key = KEYS[1]
local tomb = ARGV[1]
local window = tonumber(ARGV[2])
local drift = tonumber(ARGV[3])
local out = {0}
local count = 0
local nearest = nil
local farthest = nil
for i = 4, #ARGV, 2 do
  local hint = tonumber(ARGV[i])
  local value = ARGV[i + 1]
  local at = hint + drift
  local pos = false
  if at < 0 and redis.call('LINDEX', key, at) == value then
    pos = at
  else
    local len = redis.call('LLEN', key)
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
      local found = redis.call('LPOS', key, value, 'RANK', rank)
      if found then pos = found - len end
    end
    if pos then drift = pos - hint end
  end
  if pos then
    redis.call('LSET', key, pos, tomb)
    count = count + 1
    out[#out + 1] = 1
    if nearest == nil or -pos < nearest then nearest = -pos end
    if farthest == nil or -pos > farthest then farthest = -pos end
  else
    out[#out + 1] = 0
  end
end
if count > 0 then
  local len = redis.call('LLEN', key)
  if farthest <= len - nearest + 1 then
    redis.call('LREM', key, -count, tomb)
  else
    redis.call('LREM', key, count, tomb)
  end
end
out[1] = drift
return out
"""
