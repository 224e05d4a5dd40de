"""The Lua scripts, each on the keys of one workflow (one cluster slot) or one shared key.

Kept apart from `broker.py` so each reads on its own. They use only plain Redis commands (no cjson or
cmsgpack), so the embedded broker runs them too. Arguments are flat lists: counts, then items.
"""

# Create a workflow once: a second submit with the same id changes nothing (idempotent `--id`).
# The big fields (the spec, a signed file's text) are written by HSETNX beside it, not through Lua,
# so no script call copies megabytes. KEYS: meta   ARGV: field, value, ...
CREATE = """
if redis.call('HEXISTS', KEYS[1], 'created_at') == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# A count the scripts keep in a run's tasks hash (`reclaims`, `output_bytes`), read as
# `connection.count_of` reads it: up to 15 ASCII digits, else `otherwise` (a worker's user may write that
# hash; Lua and Python must agree on what it holds). Prefixed to the scripts that read one.
COUNT = """
local function count_in(hash, field, otherwise)
  local raw = redis.call('HGET', hash, field) or '0'
  if string.match(raw, '^%d+$') and #raw <= 15 then return tonumber(raw) end
  return otherwise
end
"""

# Commit a transition if nobody changed the workflow since it was read (the version), and the fields
# it guards still read as it saw them: what a worker's start script wrote (which moves no version).
# A run's version is the meta hash's `version` (moved by each commit) plus the tasks hash's `reclaims`
# (moved by a worker's reclaim, which may not write the meta hash), a count of up to 15 digits (anything
# else counts as 0: a worker's user may write that hash, and must not stall the run's commits with a
# value Lua and Python read differently). A run that ends marks its tasks hash `finished`, which the
# start script reads.
# KEYS: meta, tasks, results, history, outbox, done, output
# ARGV: version, n, guard pairs (tasks field, the prefix it must still have)..., n, task pairs..., n, meta pairs...,
#       n, result pairs..., n, history items...,
#       outbox id, outbox blob ('' for none), finished ('1'/'0'), ttl seconds, reopened ('1'/'0'),
#       events blob ('' for none)
# The transition's events go to the run's output stream with the commit itself: in the order of the
# state changes, and before any task it releases can stream a chunk.
# A finished workflow's keys expire after the ttl; a reopened one (`retry`) keeps them again and its
# end signal is taken back, so waiters wait for its next end.
APPLY = (
    COUNT
    + """
local meta, tasks, results, history, outbox, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local committed = redis.call('HGET', meta, 'version')
local reclaims = count_in(tasks, 'reclaims', 0)
if not committed or tonumber(committed) + reclaims ~= tonumber(ARGV[1]) then return -1 end
local i = 3 + 2 * tonumber(ARGV[2])
for g = 3, i - 1, 2 do
  local value = redis.call('HGET', tasks, ARGV[g]) or ''
  if string.sub(value, 1, #ARGV[g + 1]) ~= ARGV[g + 1] then return -1 end
end
local function each_chunk(width, fn)
  local n = tonumber(ARGV[i]); i = i + 1
  local done_items = 0
  while done_items < n do
    local take = math.min(n - done_items, 400)
    local args = {}
    for k = 0, take * width - 1 do args[#args + 1] = ARGV[i + done_items * width + k] end
    fn(args)
    done_items = done_items + take
  end
  i = i + n * width
end
each_chunk(2, function(a) redis.call('HSET', tasks, unpack(a)) end)
each_chunk(2, function(a) redis.call('HSET', meta, unpack(a)) end)
each_chunk(2, function(a) redis.call('HSET', results, unpack(a)) end)
each_chunk(1, function(a) redis.call('RPUSH', history, unpack(a)) end)
if ARGV[i + 1] ~= '' then redis.call('HSET', outbox, ARGV[i], ARGV[i + 1]) end
if (ARGV[i + 5] or '') ~= '' then redis.call('XADD', KEYS[7], '*', 'k', 'event', 'm', ARGV[i + 5]) end
local version = redis.call('HINCRBY', meta, 'version', 1) + reclaims
if ARGV[i + 2] == '1' then
  local ttl = tonumber(ARGV[i + 3])
  redis.call('HSET', tasks, 'finished', '1')
  redis.call('RPUSH', done, '1')
  for _, key in ipairs(KEYS) do
    if key ~= outbox then redis.call('EXPIRE', key, ttl) end
  end
elseif ARGV[i + 4] == '1' then
  redis.call('HDEL', tasks, 'finished')
  redis.call('DEL', done)
  for _, key in ipairs(KEYS) do redis.call('PERSIST', key) end
end
return version
"""
)

# Append to a run's output stream (kind, blob pairs: `k` and `m` of each entry), only while the run's
# keys are there: its first transition made the stream, and it expires with them, so an entry added
# later keeps their time to live. Chunks and log records count against the run's `limit` (bytes, in
# the tasks hash's `output_bytes`: workers may write it, not the meta hash); events (`limit` 0) are
# never refused.
# KEYS: tasks, output   ARGV: limit, then kind, blob...
# Returns {1, bytes used}: added; {0, bytes used}: over the limit, nothing added; {-1, 0}: no such run.
OUTPUT = (
    COUNT
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1, 0} end
local limit = tonumber(ARGV[1])
local size = 0
if limit > 0 then
  for i = 2, #ARGV, 2 do
    if ARGV[i] ~= 'event' then size = size + #ARGV[i + 1] end
  end
end
local used = count_in(KEYS[1], 'output_bytes', limit)  -- overwritten with garbage: no more room
if size > 0 then
  if used + size > limit then return {0, used} end
  used = used + size
  redis.call('HSET', KEYS[1], 'output_bytes', string.format('%d', used))
end
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[2], '*', 'k', ARGV[i], 'm', ARGV[i + 1])
end
return {1, used}
"""
)

# Mark attempts started before their handlers run, and hand out fencing tokens.
# KEYS: tasks, history   ARGV: consumer, then per message: unit, dispatch id, entry id, lost record
# Returns per message: a token (>= 1), or 0 (stale: cancelled, superseded or finished), or -1 (a
# duplicate stream entry of a dispatch another entry already started), or -2 (asked to stop before it
# (re)started: the worker declines it, and tells the coordinator).
# Packed fields (see state.PACKED), parts joined by \31: `unit|dispatch` = id, attempt, dispatched;
# `unit|run` = token, started, entry, worker.
# A reclaimed entry starts again as the next attempt of the same dispatch: every run counts, and the
# attempt it replaces goes to the history with the lost record the worker built. `unit|reclaims`
# counts them, so a reclaim does not use up the retry budget; the run's `reclaims` moves its version
# (see APPLY), so a coordinator that read the run before commits nothing on that stale view. Workers
# never write the meta hash: the run's end is read from the tasks hash's `finished`.
START = (
    COUNT
    + r"""
local tasks, history = KEYS[1], KEYS[2]
local function bump(field)  -- HINCRBY, but a count someone overwrote with garbage starts again at 1
  redis.call('HSET', tasks, field, string.format('%d', count_in(tasks, field, 0) + 1))
end
local finished = redis.call('HGET', tasks, 'finished') == '1'
local now = redis.call('TIME')
local ts = tonumber(now[1]) + tonumber(now[2]) / 1000000
local consumer = ARGV[1]
local out = {}
for i = 2, #ARGV, 4 do
  local unit, dispatch, entry, lost = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local f = unit .. '|'
  local fields = redis.call('HMGET', tasks, f .. 'state', f .. 'dispatch', f .. 'stop')
  local state, current, stop = fields[1], fields[2], fields[3]
  local token = 0
  if finished or not current or string.sub(current, 1, #dispatch + 1) ~= dispatch .. '\31' then
    token = 0
  elseif (stop or '') ~= '' and (state == 'ready' or state == 'running') then
    token = -2
  elseif state == 'ready' then
    token = 1
    redis.call('HSET', tasks, f .. 'state', 'running', f .. 'run', '1\31' .. ts .. '\31' .. entry .. '\31' .. consumer)
  elseif state == 'running' then
    local run = redis.call('HGET', tasks, f .. 'run') or ''
    local previous, _, started_entry, starter = string.match(run, '^([^\31]*)\31([^\31]*)\31([^\31]*)\31?(.*)')
    if started_entry == entry and starter == consumer then
      token = tonumber(previous) or 0  -- this worker asking again (its first call's reply was lost): the same
    elseif started_entry == entry then
      token = (tonumber(previous) or 0) + 1
      local id, attempt, dispatched = string.match(current, '^([^\31]*)\31([^\31]*)\31([^\31]*)')
      redis.call('HSET', tasks, f .. 'run', token .. '\31' .. ts .. '\31' .. entry .. '\31' .. consumer,
        f .. 'dispatch', id .. '\31' .. ((tonumber(attempt) or 1) + 1) .. '\31' .. dispatched)
      bump(f .. 'reclaims')
      bump('reclaims')
      if lost ~= '' then redis.call('RPUSH', history, lost) end
    else
      token = -1
    end
  end
  out[#out + 1] = token
end
return out
"""
)

# Claim due timers: push each one's due time forward by a lease, so a coordinator that dies before
# finishing it leaves it to fire again, and two coordinators never fire one at once.
# KEYS: timers   ARGV: lease ms, limit   Returns: now µs, the next due time ms (-1: none), due members
CLAIM_TIMERS = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[1]), member)
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or -1
table.insert(due, 1, next_due)
table.insert(due, 1, tonumber(now[1]) * 1000000 + tonumber(now[2]))
return due
"""

# Renew a lease on Redis's clock: `NAME|expires` is when the holder is presumed dead.
# KEYS: leases hash   ARGV: name, ttl ms, info blob   Returns: now ms
LEASE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. '|expires', ms + tonumber(ARGV[2]))
return ms
"""

# Append many entries to one stream in one call: a dispatcher's batch costs one command, not one
# per message (redis-py spends ~10 µs of Python on each command of a pipeline).
# KEYS: stream   ARGV: field, then the values   Returns: how many were added
XADD_MANY = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[i])
end
return #ARGV - 1
"""
