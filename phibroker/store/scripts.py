"""The Lua scripts, each on the keys of one workflow (one cluster slot) or one shared key.

Kept apart from the store's roles, which call them, so each reads on its own. They use only plain
Redis commands (no cjson or cmsgpack). Arguments are flat lists: counts, then items.
"""

# Create a workflow once: a second submit with the same id changes nothing (idempotent `--id`).
# The big fields (the spec, a signed file's text) are written by HSETNX beside it, not through Lua,
# so no script call copies megabytes. KEYS: meta   ARGV: field, value, ...
CREATE = """
if redis.call('HEXISTS', KEYS[1], 'created_at') == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# A count as the scripts read one, from text workers may have written: up to 15 ASCII digits, else
# nil (`state.digits` reads it alike). Prefixed to the scripts that read one.
COUNT = """
local function count(raw)
  if raw and string.match(raw, '^%d+$') and #raw <= 15 then return tonumber(raw) end
  return nil
end
"""

# Commit a transition if nobody changed the workflow since it was read (its `version`), and the start
# marks it guards still read as it saw them: workers mark the units they start in their agent's own
# hash (see START), which moves no version. A run that ends marks its tasks hash `finished`, which the
# start script reads.
# KEYS: meta, tasks, results, history, outbox, done, output, then per agent its marks, its lost attempts,
#       its output and the output's bytes (state.Transition.marked_agents, `Keys.wf_agent_keys`)
# ARGV: version, n, guards (key of the marks, unit, dispatch id, token: 0 for none)..., n, task pairs...,
#       n, meta pairs..., n, result pairs..., n, history items..., n, lost attempts moved (key, how many)...,
#       outbox id, outbox blob ('' for none), finished ('1'/'0'), ttl seconds, reopened ('1'/'0'),
#       events blob ('' for none)
# The lost attempts moved are the first ones of an agent's list, read with the run: those about the
# agent's own units are among the history items. START only appends to the list.
# The transition's events go to the run's output stream with the commit itself: in the order of the
# state changes, and before any task it releases can stream a chunk. Readers put the run's events
# before its agents' output within a millisecond (a dispatch before its task's first chunk): when an
# agent of the commit wrote its output in this very millisecond (the chunks before a result), the
# events take the next one, so they come after that output (`after_output`).
# A finished workflow's keys expire after the ttl; a reopened one (`retry`) keeps them again and its
# end signal is taken back, so waiters wait for its next end.
APPLY = (
    COUNT
    + r"""
local meta, tasks, results, history, outbox, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local function last_ms(stream)
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  return newest and tonumber(string.match(newest[1], '^(%d+)')) or 0
end
local function after_output()
  local now = nil
  for k = 10, #KEYS, 4 do  -- each agent's output stream (`Keys.wf_agent_keys`: marks, lost, output, bytes)
    local wrote = last_ms(KEYS[k])
    if wrote > 0 then
      if not now then
        local clock = redis.call('TIME')
        now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
      end
      if wrote == now and last_ms(KEYS[7]) <= now then return string.format('%d-*', now + 1) end
    end
  end
  return '*'
end
local committed = redis.call('HGET', meta, 'version')
if not committed or tonumber(committed) ~= tonumber(ARGV[1]) then return -1 end
local i = 3 + 4 * tonumber(ARGV[2])
for g = 3, i - 1, 4 do
  local mark = ''  -- one too long to be one reads as none, as START and `state.MARK_BYTES` read it
  if redis.call('HSTRLEN', ARGV[g], ARGV[g + 1]) <= 512 then mark = redis.call('HGET', ARGV[g], ARGV[g + 1]) or '' end
  local dispatch, token = string.match(mark, '^([^\31]*)\31([^\31]*)')
  if dispatch ~= ARGV[g + 2] then token = '0' end
  if (count(token) or 0) ~= tonumber(ARGV[g + 3]) then return -1 end
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
each_chunk(2, function(a)
  for k = 1, #a, 2 do redis.call('LTRIM', a[k], tonumber(a[k + 1]), -1) end
end)
if ARGV[i + 1] ~= '' then redis.call('HSET', outbox, ARGV[i], ARGV[i + 1]) end
if (ARGV[i + 5] or '') ~= '' then  -- the commit never fails on its events' entry
  redis.pcall('XADD', KEYS[7], after_output(), 'k', 'event', 'm', ARGV[i + 5])
end
local version = redis.call('HINCRBY', meta, 'version', 1)
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

# Append to the agent's own output stream of a run (kind, blob pairs: `k` and `m` of each entry), only
# while the run's keys are there: its first transition made the run's output stream, and the agent's
# keys expire with it, so an entry added later keeps their time to live. Chunks and log records count
# against the `limit` (bytes, kept in the agent's `output-bytes` of the run; 0: no limit); its tasks'
# starts never.
# KEYS: the run's output, the agent's output, its bytes   ARGV: limit, then kind, blob...
# Returns {1, bytes used}: added; {0, bytes used}: over the limit, nothing added; {-1, 0}: no such run.
OUTPUT = (
    COUNT
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local limit = tonumber(ARGV[1])
local size = 0
if limit > 0 then
  for i = 2, #ARGV, 2 do
    if ARGV[i] ~= 'event' then size = size + #ARGV[i + 1] end
  end
end
local used = count(redis.call('GET', KEYS[3]) or '0') or limit  -- overwritten with garbage: no more room
if size > 0 then
  if used + size > limit then return {0, used} end
  used = used + size
  redis.call('SET', KEYS[3], string.format('%d', used))
end
for i = 2, #ARGV, 2 do  -- a stream its agent broke (its last possible id taken) keeps nothing more
  redis.pcall('XADD', KEYS[2], '*', 'k', ARGV[i], 'm', ARGV[i + 1])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {1, used}
"""
)

# Mark attempts started before their handlers run, and hand out fencing tokens.
# KEYS: the agent's marks hash of the run, its lost attempts   ARGV: the run's tasks hash, the agent, the
# consumer, then per message: unit, dispatch id, entry id, lost record
# Only the agent's own units are started: those whose dispatch (`unit|dispatch`: id, attempt,
# dispatched, agent) names it.
# The tasks hash is read, never written, so it is not among KEYS: Redis asks a script's KEYS for write
# permission, and an agent's user may only read it. It shares the run's hash tag, so on a cluster it
# is in the same slot.
# Returns per message: a token (>= 1), or 0 (stale: cancelled, superseded or finished), or -1 (a
# duplicate stream entry of a dispatch another entry already started, or an entry id or consumer name
# too long to be one), or -2 (asked to stop before it (re)started: the worker declines it, and tells the
# coordinator).
# Bounded, as an agent's user may call it with any arguments: at most 1,000 messages a call, and a mark
# too long to be one (its own workers may write anything there) reads as none.
# A mark (see state.MARK), parts joined by \31: dispatch id, token, started, entry, worker.
# A reclaimed entry starts again as the next attempt of the same dispatch: every run counts, and the
# attempt it replaces goes to the agent's lost attempts with the record the worker built (`unit \31
# record`), which the coordinators move into the history. The token counts the reclaims, so a reclaim
# does not use up the retry budget; the coordinators' commits are guarded on the mark's token, so one
# that read the unit before commits nothing on that stale view.
START = (
    COUNT
    + r"""
local marks, lost_attempts, tasks, agent = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local finished = redis.call('HGET', tasks, 'finished') == '1'
local now = redis.call('TIME')
local ts = tonumber(now[1]) + tonumber(now[2]) / 1000000
local consumer = ARGV[3]
if #ARGV > 3 + 4 * 1000 then return redis.error_reply('ERR START takes at most 1000 messages a call') end
local out = {}
for i = 4, #ARGV, 4 do
  local unit, dispatch, entry, lost = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local f = unit .. '|'
  local fields = redis.call('HMGET', tasks, f .. 'state', f .. 'dispatch', f .. 'stop')
  local state, stop = fields[1], fields[3]
  local current, owner = string.match(fields[2] or '', '^([^\31]*)\31[^\31]*\31[^\31]*\31([^\31]*)')
  local token = 0
  if finished or current ~= dispatch or owner ~= agent or not (state == 'ready' or state == 'running') then
    token = 0
  elseif #entry > 64 or #consumer > 256 then
    token = -1
  elseif (stop or '') ~= '' then
    token = -2
  else
    local mark = {}
    if redis.call('HSTRLEN', marks, unit) <= 512 then  -- `state.MARK_BYTES`
      for part in string.gmatch((redis.call('HGET', marks, unit) or '') .. '\31', '([^\31]*)\31') do
        mark[#mark + 1] = part
      end
    end
    if mark[1] ~= dispatch then  -- the dispatch's first start
      token = 1
      redis.call('HSET', marks, unit, table.concat({dispatch, 1, ts, entry, consumer}, '\31'))
    elseif mark[4] == entry and mark[5] == consumer then
      token = count(mark[2]) or 0  -- this worker asking again (its first call's reply was lost): the same
    elseif mark[4] == entry and count(mark[2]) then
      token = count(mark[2]) + 1
      redis.call('HSET', marks, unit, table.concat({dispatch, token, ts, entry, consumer}, '\31'))
      if lost ~= '' then redis.call('RPUSH', lost_attempts, unit .. '\31' .. lost) end
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

# Renew a lease on Redis's clock: `NAME|expires` is when the holder is presumed dead. An agent's user may
# call it with any arguments on its own hash: what it writes stays the size of a fleet's leases.
# KEYS: leases hash   ARGV: name, ttl ms, info blob   Returns: now ms
LEASE = """
if #ARGV[1] > 512 or #ARGV[3] > 24576 then
  return redis.error_reply('ERR a lease name of at most 512 bytes, its info at most 24 KiB')
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= 2000 then
  return redis.error_reply('ERR 1000 leases in this hash already')
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], ARGV[1] .. '|expires', ms + tonumber(ARGV[2]))
return ms
"""

# What a key takes in memory, to bound a read of what an agent wrote before fetching it. 0 where the
# server has no MEMORY USAGE (the embedded broker of `phibroker dev`, with no agents' users to fear)
# or the user may not ask (one generated before these scripts: `acl generate` grants it now).
SIZE_OF = """
local function size_of(key)
  return tonumber(redis.pcall('MEMORY', 'USAGE', key, 'SAMPLES', 0)) or 0
end
"""

# An agent's own keys of a run, read for a coordinator or a view (read-only: EVALSHA_RO). Its workers
# write them as they like, so what is read stays bounded: each named unit's mark only if it is short
# enough to be one, and the first lost attempts only if the list takes no more memory than lost
# attempts do. A list past that reads as none, and its count says how many the next commit trims: all.
# KEYS: marks, lost   ARGV: mark limit, lost limit (entries, then bytes of the list; 0: not read), units
# Returns: {marks (nil: none or too long), lost attempts, how many the next commit trims}
READ_OWN = (
    SIZE_OF
    + """
local limit = tonumber(ARGV[1])
local marks = {}
for i = 4, #ARGV do
  marks[i - 3] = redis.call('HSTRLEN', KEYS[1], ARGV[i]) <= limit and redis.call('HGET', KEYS[1], ARGV[i])
end
local lost, count, bytes = {}, 0, tonumber(ARGV[3])
if bytes > 0 then
  count = redis.call('LLEN', KEYS[2])
  if count > 0 and size_of(KEYS[2]) <= bytes then
    lost = redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)
    count = #lost
  end
end
return {marks, lost, count}
"""
)

# Agents' worker lease hashes, read for a coordinator or a view (read-only: EVALSHA_RO), each whole or,
# past what a fleet writes (its own agent's doing), not at all; with Redis's clock, which stamped them.
# KEYS: a key of their slot (whose node's clock is read, with no hash to read), then the lease hashes
# ARGV: fields, bytes a hash may hold   Returns: {seconds, microseconds, each hash's HGETALL ({} if too big)}
READ_LEASES = (
    SIZE_OF
    + """
local now = redis.call('TIME')
local out = {now[1], now[2]}
for i = 2, #KEYS do
  local fields = redis.call('HLEN', KEYS[i])
  local fits = fields > 0 and fields <= tonumber(ARGV[1]) and size_of(KEYS[i]) <= tonumber(ARGV[2])
  out[i + 1] = fits and redis.call('HGETALL', KEYS[i]) or {}
end
return out
"""
)

# Append many entries to one stream in one call: a dispatcher's batch costs one command, not one
# per message (redis-py spends ~10 µs of Python on each command of a pipeline).
# KEYS: stream   ARGV: field, then the values   Returns: how many were added
XADD_MANY = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[i])
end
return #ARGV - 1
"""
