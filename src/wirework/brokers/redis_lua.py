"""The Lua text of the Redis backend's scripts, one string per script.

``redis_scripts`` says what each script does and for what, and assembles these
into EVAL scripts and one Redis Functions library; this module only holds
their source, which is most of the backend's size.
"""

from __future__ import annotations

# Shared helpers of every script. As EVAL scripts (Redis before 7) each one
# starts with them; in the function library (``LIBRARY``) they are defined once and
# ``P`` is set at the start of every call (Redis runs one call at a time).
HELPERS = r"""

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A topic's keys and, given a group, the group's. Without one (a publish, stats) only the
-- topic's are built: half the strings, on the way of every publish.
local function ctx(T, G)
  if not G then
    return {
      T = T,
      stream = P .. 't:' .. T, td = P .. 'td:' .. T, tm = P .. 'tm:' .. T, wake = P .. 'w:' .. T,
      idle = P .. 'idle:' .. T, ic = P .. 'ic:' .. T, ih = P .. 'ih:' .. T,
    }
  end
  local tg = T .. ':' .. G
  return {
    T = T, G = G,
    stream = P .. 't:' .. T, td = P .. 'td:' .. T, tm = P .. 'tm:' .. T, wake = P .. 'w:' .. T,
    idle = P .. 'idle:' .. T, ic = P .. 'ic:' .. T, ih = P .. 'ih:' .. T,
    rstream = P .. 'r:' .. tg, meta = P .. 'g:' .. tg, due = P .. 'due:' .. tg,
    lease = P .. 'lease:' .. tg, pdue = P .. 'pdue:' .. tg, fail = P .. 'fail:' .. tg,
    keys = P .. 'k:' .. tg .. ':', keyset = P .. 'ks:' .. tg,
  }
end

-- Tell other processes' subscriptions of the topic to look again, if one said it is idle
-- (its last fetch found nothing): a busy subscription fetches again by itself.
local function wake(c)
  if redis.call('DEL', c.idle) == 1 then redis.call('PUBLISH', c.wake, '') end
end

local function hash(list)
  local t = {}
  for i = 1, #list, 2 do t[list[i]] = list[i + 1] end
  return t
end

local function split_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function id_less(a, b)
  local am, as = split_id(a)
  local bm, bs = split_id(b)
  return am < bm or (am == bm and as < bs)
end

local function locate(c, m)
  if string.sub(m, 1, 1) == 'r' then return c.rstream, string.sub(m, 2) end
  return c.stream, m
end

local function member_less(a, b)
  local _, x = locate({}, a)
  local _, y = locate({}, b)
  if x == y then return a < b end
  return id_less(x, y)
end

-- 1: the consumer holds this attempt; 0: someone else or a later attempt does; 2: not pending.
local function holder(c, m, consumer, attempt)
  local s, id = locate(c, m)
  local p = redis.pcall('XPENDING', s, c.G, id, id, 1)
  if type(p) ~= 'table' or p.err or #p == 0 then return 2 end
  if p[1][2] == consumer and tonumber(p[1][4]) == attempt then return 1 end
  return 0
end

local function entry(c, m)
  local s, id = locate(c, m)
  local e = redis.call('XRANGE', s, id, id)
  if #e == 0 then return nil end
  return hash(e[1][2])
end

-- Another group still needs this topic entry: it has not read it yet, or holds it pending.
-- ``tm``'s ``groups`` (set from XINFO whenever a group is created or deleted) spares the
-- XINFO of every ack while the topic has one group; missing (older data) means "look".
local function needed_elsewhere(c, id)
  if redis.call('HGET', c.tm, 'groups') == '1' then return false end
  local groups = redis.pcall('XINFO', 'GROUPS', c.stream)
  if type(groups) ~= 'table' or groups.err then return false end
  for _, info in ipairs(groups) do
    local g = hash(info)
    if g['name'] ~= c.G then
      if id_less(g['last-delivered-id'], id) then return true end
      if #redis.call('XPENDING', c.stream, g['name'], id, id, 1) > 0 then return true end
    end
  end
  return false
end

local function unpark(c, m, now)
  redis.call('HINCRBY', c.meta, 'parked', -1)
  local due = tonumber(redis.call('HGET', c.pdue, m) or '0')
  redis.call('HDEL', c.pdue, m)
  redis.call('ZADD', c.due, math.max(now or now_ms(), due), m)
end

-- The copy leaves the group for good (ack, dead letter); the entry goes once no group needs it,
-- and the next copy of its key, parked until now, may be handed out. Returns whether it woke one.
-- ``f`` needs only the key (``k``); ``now`` may be nil (read when a copy is unparked).
local function remove(c, m, f, now)
  local s, id = locate(c, m)
  redis.call('XACK', s, c.G, id)
  if s == c.rstream then
    redis.call('XDEL', s, id)
  elseif not needed_elsewhere(c, id) then
    redis.call('XDEL', s, id)
    redis.call('ZREM', c.td, id)
  end
  redis.call('ZREM', c.lease, m)
  redis.call('ZREM', c.due, m)
  redis.call('HDEL', c.fail, m)
  if f and f['k'] then
    local list = c.keys .. f['k']
    local was_head = redis.call('LINDEX', list, 0) == m
    redis.call('LREM', list, 1, m)
    if redis.call('LLEN', list) == 0 then redis.call('SREM', c.keyset, f['k']) end
    if was_head then
      local nxt = redis.call('LINDEX', list, 0)
      if nxt then
        unpark(c, nxt, now)
        return true
      end
    end
  end
  return false
end

-- Create the group if it is new, at 'earliest' (all the stream keeps) or 'latest'.
local function create_group(c, start)
  local from = '$'
  if start == 'earliest' then from = '0' end
  local made = redis.pcall('XGROUP', 'CREATE', c.stream, c.G, from, 'MKSTREAM')
  redis.call('SADD', P .. 'topics', c.T)
  if type(made) == 'table' and made.err then
    if string.find(made.err, 'BUSYGROUP', 1, true) then return false end
    return error(made.err)
  end
  local added = tonumber(redis.call('HGET', c.tm, 'added') or '0')
  local base = added
  local groups = #redis.call('XINFO', 'GROUPS', c.stream)
  redis.call('HSET', c.tm, 'groups', groups)
  if start == 'earliest' then
    base = added - redis.call('XLEN', c.stream)
  elseif groups == 1 then
    -- Kept only because no group existed yet: not this group's to read, and nobody else's.
    redis.call('XTRIM', c.stream, 'MAXLEN', 0)
    redis.call('DEL', c.td)
  end
  redis.call('HSET', c.meta, 'base', base, 'read', 0, 'parked', 0)
  return true
end

-- Queue a copy behind the group's earlier copies of its key; true if it is the head.
local function enqueue(c, key, m)
  local head = redis.call('RPUSH', c.keys .. key, m) == 1
  if head then redis.call('SADD', c.keyset, key) end
  return head
end

-- New messages for ``consumer``, in stream order: handed out (``emit``: a first delivery,
-- leased) or parked behind their key or their delay. Returns how many it emitted, whether
-- it stopped at ``scan_limit`` with more to read, and whether it read all the group had.
local function take_new(c, consumer, want, lease_ms, scan_limit, now, emit)
  local taken, scanned = 0, 0
  while taken < want do
    if scanned >= scan_limit then return taken, true, false end
    local count = math.min(want - taken, scan_limit - scanned)
    local got = redis.call(
      'XREADGROUP', 'GROUP', c.G, consumer, 'COUNT', count, 'STREAMS', c.stream, '>')
    if not got or #got == 0 or #got[1][2] == 0 then return taken, false, true end
    local entries = got[1][2]
    -- Fewer than asked for: the group has read the whole stream (nothing can be added
    -- while a script runs), so no second XREADGROUP to find that out.
    local drained = #entries < count
    redis.call('HINCRBY', c.meta, 'read', #entries)
    for _, e in ipairs(entries) do
      scanned = scanned + 1
      local id, f = e[1], hash(e[2])
      local due = tonumber(f['d'] or '0')
      local later = due > now
      local head = true
      if f['k'] then head = enqueue(c, f['k'], id) end
      if head and not later then
        redis.call('ZADD', c.lease, now + lease_ms, id)
        emit(id, 1, f, true)
        taken = taken + 1
      else
        redis.call('XCLAIM', c.stream, c.G, '-', 0, id, 'RETRYCOUNT', 0, 'JUSTID')
        if head then
          redis.call('ZADD', c.due, due, id)
        else
          redis.call('HINCRBY', c.meta, 'parked', 1)
          if later then redis.call('HSET', c.pdue, id, due) end
        end
      end
    end
    if drained then return taken, false, true end
  end
  return taken, false, false
end

-- Hand what the topic's groups have not read to one registered idle consumer per group
-- (``ic:T``). The wake-up's payload (``redis_link.handovers`` reads it): a version byte
-- (1), then per consumer its name, its row count (4 bytes) and 1 if its room is used up
-- (else 0; 1 byte), then per row (a first delivery: attempt 1, no failure) its member,
-- headers and body, 1 and its key or 0. A string is its length (4 bytes, big-endian) and
-- its bytes. ``struct.pack`` frames a row in one call in C: netstrings ("<length>:") took
-- a number-to-text conversion per field (6.5 us a row against 1.2 us, Redis 7.0). Empty
-- when nothing was handed over.
local function hand_over(c, now)
  local registered = redis.call('HGETALL', c.ic)
  if #registered == 0 then return '' end
  local parts, served = {'\1'}, {}
  for i = 1, #registered, 2 do
    local consumer = registered[i]
    local G, free, lease_ms, till = string.match(registered[i + 1], '^(%S+) (%d+) (%d+) (%d+)$')
    free, lease_ms, till = tonumber(free), tonumber(lease_ms), tonumber(till)
    if not G or till < now or free <= 0 then
      redis.call('HDEL', c.ic, consumer)
    elseif not served[G] then
      local g = ctx(c.T, G)
      local rows = {}
      local function emit(m, _, f)
        local h, b, k = f['h'] or '{}', f['b'] or '', f['k']
        rows[#rows + 1] = struct.pack('>I4c0I4c0I4c0', #m, m, #h, h, #b, b)
        if k then
          rows[#rows + 1] = struct.pack('>BI4c0', 1, #k, k)
        else
          rows[#rows + 1] = '\0'
        end
      end
      local ok, taken = pcall(take_new, g, consumer, free, lease_ms, free + 256, now, emit)
      if not ok then
        redis.call('HDEL', c.ic, consumer)  -- its group is gone: a fetch creates it again
      elseif taken > 0 then
        served[G] = true
        local before = string.match(redis.call('HGET', c.ih, consumer) or '0', '^(%d+)')
        redis.call('HSET', c.ih, consumer, (tonumber(before) + taken) .. ' ' .. now)
        -- Its room used up: no more hand-overs, and it fetches once it has room again.
        local full = taken >= free
        if full then
          redis.call('HDEL', c.ic, consumer)
        else
          local left = G .. ' ' .. (free - taken) .. ' ' .. lease_ms .. ' ' .. till
          redis.call('HSET', c.ic, consumer, left)
        end
        parts[#parts + 1] = struct.pack('>I4c0I4B', #consumer, consumer, taken, full and 1 or 0)
        for _, piece in ipairs(rows) do parts[#parts + 1] = piece end
      end
    end
  end
  if #parts == 1 then return '' end
  return table.concat(parts)
end

local function forget_consumer(c, consumer)
  for _, s in ipairs({c.stream, c.rstream}) do
    local p = redis.pcall('XPENDING', s, c.G, '-', '+', 1, consumer)
    if type(p) == 'table' and not p.err and #p == 0 then
      redis.pcall('XGROUP', 'DELCONSUMER', s, c.G, consumer)
    end
  end
end
"""

_PUBLISH = r"""
-- ARGV: prefix, topic, headers, body, has_key, key, delay_ms, publish_id, dedup_ttl_ms, max_length
local c = ctx(ARGV[2])
local pid_key = P .. 'pid:' .. ARGV[8]
if redis.call('EXISTS', pid_key) == 1 then
  -- Stored by an earlier attempt. A write all the same, so WAITAOF on this connection
  -- covers it, and the AOF (written in order) then holds the earlier attempt too.
  redis.call('PEXPIRE', pid_key, ARGV[9])
  return 2
end
local max_length = tonumber(ARGV[10])
if max_length > 0 and redis.call('XLEN', c.stream) >= max_length then return 3 end
local now = now_ms()
local fields = {'h', ARGV[3], 'b', ARGV[4]}
if ARGV[5] == '1' then
  fields[#fields + 1] = 'k'
  fields[#fields + 1] = ARGV[6]
end
local delay = tonumber(ARGV[7])
local due = 0
if delay > 0 then
  due = now + delay
  fields[#fields + 1] = 'd'
  fields[#fields + 1] = due
end
local id = redis.call('XADD', c.stream, '*', unpack(fields))
if due > 0 then
  redis.call('ZREMRANGEBYSCORE', c.td, '-inf', now)
  redis.call('ZADD', c.td, due, id)
end
-- The topic is listed (for stats) with its first message: the list loses it only when
-- ``tm:T`` goes too (the topic's last group deleted), and ``added`` then starts again at 1.
if redis.call('HINCRBY', c.tm, 'added', 1) == 1 then redis.call('SADD', P .. 'topics', ARGV[2]) end
-- The id is remembered last, once the message is stored: a script that fails part way
-- (Redis does not roll one back) must leave a re-send of this id free to store it. Taking
-- it first with SET NX saved one call but could turn such a failure, with its reply lost,
-- into a "duplicate" reported as stored: a lost message.
redis.call('SET', pid_key, '1', 'PX', ARGV[9])
local handed = ''
if due == 0 then handed = hand_over(c, now) end
if redis.call('DEL', c.idle) == 1 or handed ~= '' then redis.call('PUBLISH', c.wake, handed) end
return 1
"""

_JOIN = r"""
-- ARGV: prefix, topic, group, start ('earliest' | 'latest')
local c = ctx(ARGV[2], ARGV[3])
create_group(c, ARGV[4])
-- Consumers that hold nothing are only names; crashed subscriptions leave them behind.
for _, s in ipairs({c.stream, c.rstream}) do
  local consumers = redis.pcall('XINFO', 'CONSUMERS', s, c.G)
  if type(consumers) == 'table' and not consumers.err then
    for _, info in ipairs(consumers) do
      local one = hash(info)
      if one['name'] ~= '-' and tonumber(one['pending']) == 0 then
        redis.call('XGROUP', 'DELCONSUMER', s, c.G, one['name'])
      end
    end
  end
end
return 1
"""

_FETCH = r"""
-- ARGV: prefix, topic, group, consumer, free, lease_ms, scan_limit, seen, idle_ms, recover,
-- then with recover '1' the members the subscription holds.
-- Returns {next_ms, more, member, attempt, first_failure, headers, body, has_key, key, ...}.
-- next_ms -2: it filled ``free`` (fetch again at once); else it emptied the stream and
-- said so (``idle``): -1, nothing scheduled, or the ms until the next copy falls due.
-- ``seen``: messages handed over to this consumer that its subscription has received;
-- ``idle_ms``: how long its registration for hand-overs (``ic:T``) may count at most (0:
-- none, its wake-ups are not being listened to); ``recover``: its wake-ups may have been
-- lost (the listening connection broke): copies leased to it that it does not hold come
-- again in this fetch, ahead of everything else.
local c = ctx(ARGV[2], ARGV[3])
local consumer = ARGV[4]
local free, lease_ms, scan_limit = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
redis.call('HDEL', c.ic, consumer)
-- Handed over but not received yet (its wake-up is on the way): already held. A wake-up
-- that has not come in a second was lost with its connection: those copies stay leased
-- until their lease runs out (or the subscription's release hands them back).
local handed = redis.call('HGET', c.ih, consumer)
if ARGV[10] == '1' then
  handed = nil  -- whatever was handed over and not seen comes again below
  redis.call('HSET', c.ih, consumer, ARGV[8] .. ' ' .. now)
end
if handed then
  local count, at = string.match(handed, '^(%d+) (%d+)$')
  local unseen = tonumber(count) - tonumber(ARGV[8])
  if unseen > 0 and now - tonumber(at) > 1000 then
    redis.call('HSET', c.ih, consumer, ARGV[8] .. ' ' .. at)
  elseif unseen > 0 then
    free = free - unseen
    if free <= 0 then return {1, 0} end  -- look again once the wake-up is in
  end
end
local out = {-2, 0}
local taken = 0
local drained = false

-- ``fresh``: a first delivery, which has no failure recorded yet.
local function emit(m, attempt, f, fresh)
  local first = ''
  if not fresh then
    first = string.match(redis.call('HGET', c.fail, m) or '', '^(%d+)') or ''
  end
  local k = f['k']
  out[#out + 1] = m
  out[#out + 1] = attempt
  out[#out + 1] = first
  out[#out + 1] = f['h'] or '{}'
  out[#out + 1] = f['b'] or ''
  out[#out + 1] = k and '1' or '0'
  out[#out + 1] = k or ''
  taken = taken + 1
end

if ARGV[10] == '1' then
  local known = {}
  for i = 11, #ARGV do known[ARGV[i]] = true end
  local pending = redis.call('XPENDING', c.stream, c.G, '-', '+', free + #ARGV - 10, consumer)
  for _, p in ipairs(pending) do
    local m = p[1]
    if not known[m] and redis.call('ZSCORE', c.lease, m) then
      local f = entry(c, m)
      if f then
        redis.call('ZADD', c.lease, now + lease_ms, m)
        emit(m, tonumber(p[4]), f, false)
      end
    end
  end
  if taken >= free then return out end
end

-- Copies that wait no longer (nacked, handed back, due) and leases that ran out, oldest first.
local ready = redis.call('ZRANGEBYSCORE', c.due, '-inf', now, 'LIMIT', 0, free - taken)
for _, m in ipairs(redis.call('ZRANGEBYSCORE', c.lease, '-inf', now, 'LIMIT', 0, free - taken)) do
  ready[#ready + 1] = m
end
table.sort(ready, member_less)
for i = 1, math.min(#ready, free - taken) do
  local m = ready[i]
  local s, id = locate(c, m)
  local claimed = redis.pcall('XCLAIM', s, c.G, consumer, 0, id)
  redis.call('ZREM', c.due, m)
  if claimed.err or #claimed == 0 or not claimed[1] or not claimed[1][2] then
    -- The entry (or a replay stream's group) is gone: nothing is left to hand out.
    redis.call('ZREM', c.lease, m)
  else
    redis.call('ZADD', c.lease, now + lease_ms, m)
    local p = redis.call('XPENDING', s, c.G, id, id, 1)
    emit(m, tonumber(p[1][4]), hash(claimed[1][2]), false)
  end
end

-- New messages, in stream order: handed out, or parked behind their key or their delay.
if taken < free then
  local _, stopped, read_all = take_new(c, consumer, free - taken, lease_ms, scan_limit, now, emit)
  if stopped then out[2] = 1 end
  drained = read_all
end

if out[2] == 1 or (taken > 0 and not drained) then return out end
-- Nothing more to hand out: say so (a publish or settle then wakes it over pub/sub), and
-- when the next waiting copy falls due or lease runs out, so that it can sleep till then.
-- Also when it took some: the subscription then waits after handing them out, instead of
-- a fetch that would find nothing (a round trip per message of a quiet topic).
redis.call('SET', c.idle, '1')
if taken < free and tonumber(ARGV[9]) > 0 then
  redis.call('HSET', c.ic, consumer,
             c.G .. ' ' .. (free - taken) .. ' ' .. lease_ms .. ' ' .. (now + tonumber(ARGV[9])))
end
local nxt = -1
for _, z in ipairs({c.due, c.lease}) do
  local first = redis.call('ZRANGEBYSCORE', z, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first > 0 then
    local wait = tonumber(first[2]) - now
    if nxt < 0 or wait < nxt then nxt = wait end
  end
end
out[1] = nxt
return out
"""

_ACK = r"""
-- ARGV: prefix, topic, group, consumer, member, attempt, has_key, key
-- The key comes from the delivery (entries never change), so the entry is not read back.
local c = ctx(ARGV[2], ARGV[3])
local m = ARGV[5]
local state = holder(c, m, ARGV[4], tonumber(ARGV[6]))
if state ~= 1 then return state end
local f = {}
if ARGV[7] == '1' then f['k'] = ARGV[8] end
if remove(c, m, f, nil) then
  wake(c)
  return 4
end
return 1
"""

_NACK = r"""
-- ARGV: prefix, topic, group, consumer, member, attempt, delay_ms, error_json ('' = none)
local c = ctx(ARGV[2], ARGV[3])
local m = ARGV[5]
local state = holder(c, m, ARGV[4], tonumber(ARGV[6]))
if state ~= 1 then return state end
local now = now_ms()
local s, id = locate(c, m)
redis.call('XCLAIM', s, c.G, '-', 0, id, 'JUSTID')
redis.call('ZREM', c.lease, m)
redis.call('ZADD', c.due, now + tonumber(ARGV[7]), m)
if ARGV[8] ~= '' then
  local fail = redis.call('HGET', c.fail, m) or ''
  local first = string.match(fail, '^(%d+)') or tostring(now)
  redis.call('HSET', c.fail, m, first .. '\n' .. ARGV[8])
end
wake(c)
return 1
"""

_DEAD_LETTER = r"""
-- ARGV: prefix, topic, group, consumer, member, attempt, reason, error_json ('' = none)
local c = ctx(ARGV[2], ARGV[3])
local m = ARGV[5]
local attempt = tonumber(ARGV[6])
local state = holder(c, m, ARGV[4], attempt)
if state ~= 1 then return state end
local now = now_ms()
local f = entry(c, m) or {}
local fail = redis.call('HGET', c.fail, m) or ''
local first, last_error = string.match(fail, '^(%d+)\n(.*)$')
local err = ARGV[8]
if err == '' then err = last_error or '' end
local record = {
  't', c.T, 'g', c.G, 'r', ARGV[7], 'a', attempt, 'f', first or now, 'l', now,
  'e', err, 'h', f['h'] or '{}', 'b', f['b'] or '',
}
if f['k'] then
  record[#record + 1] = 'k'
  record[#record + 1] = f['k']
end
redis.call('XADD', P .. 'dlq', '*', unpack(record))
redis.call('HINCRBY', P .. 'dlqn', c.T .. ' ' .. c.G, 1)
if remove(c, m, f, now) then
  wake(c)
  return 4
end
return 1
"""

_RELEASE = r"""
-- ARGV: prefix, topic, group, consumer, then (member, attempt, restore) triples.
-- Hands held copies back at once; restore '1' undoes the count of one never handed to code.
local c = ctx(ARGV[2], ARGV[3])
local consumer = ARGV[4]
local now = now_ms()
local moved = 0
for i = 5, #ARGV, 3 do
  local m, attempt = ARGV[i], tonumber(ARGV[i + 1])
  if holder(c, m, consumer, attempt) == 1 then
    local count = attempt
    if ARGV[i + 2] == '1' then count = attempt - 1 end
    local s, id = locate(c, m)
    redis.call('XCLAIM', s, c.G, '-', 0, id, 'RETRYCOUNT', count, 'JUSTID')
    redis.call('ZREM', c.lease, m)
    redis.call('ZADD', c.due, now, m)
    moved = moved + 1
  end
end
-- Copies handed over in a wake-up the subscription never received: never handed to code.
redis.call('HDEL', c.ic, consumer)
if redis.call('HDEL', c.ih, consumer) == 1 then
  local pending = redis.pcall('XPENDING', c.stream, c.G, '-', '+', 1000, consumer)
  if type(pending) == 'table' and not pending.err then
    for _, p in ipairs(pending) do
      local id, attempt = p[1], tonumber(p[4])
      redis.call('XCLAIM', c.stream, c.G, '-', 0, id, 'RETRYCOUNT', attempt - 1, 'JUSTID')
      redis.call('ZREM', c.lease, id)
      redis.call('ZADD', c.due, now, id)
      moved = moved + 1
    end
  end
end
if moved > 0 then wake(c) end
forget_consumer(c, consumer)
return moved
"""

_REPLAY = r"""
-- ARGV: prefix, dead-letter ids... Returns {1, moved} or {0, unknown_id} (then nothing moved).
local dlq = P .. 'dlq'
local records = {}
for i = 2, #ARGV do
  local e = redis.call('XRANGE', dlq, ARGV[i], ARGV[i])
  if #e == 0 then return {0, ARGV[i]} end
  records[#records + 1] = {ARGV[i], hash(e[1][2])}
end
local now = now_ms()
for _, rec in ipairs(records) do
  local id, f = rec[1], rec[2]
  local c = ctx(f['t'], f['g'])
  create_group(c, 'latest')
  redis.pcall('XGROUP', 'CREATE', c.rstream, c.G, '0', 'MKSTREAM')
  local fields = {'h', f['h'], 'b', f['b']}
  if f['k'] then
    fields[#fields + 1] = 'k'
    fields[#fields + 1] = f['k']
  end
  local rid = redis.call('XADD', c.rstream, '*', unpack(fields))
  redis.call('XCLAIM', c.rstream, c.G, '-', 0, rid, 'FORCE', 'RETRYCOUNT', 0, 'JUSTID')
  local m = 'r' .. rid
  local head = true
  if f['k'] then head = enqueue(c, f['k'], m) end
  if head then
    redis.call('ZADD', c.due, now, m)
  else
    redis.call('HINCRBY', c.meta, 'parked', 1)
  end
  redis.call('XDEL', dlq, id)
  redis.call('HINCRBY', P .. 'dlqn', c.T .. ' ' .. c.G, -1)
  wake(c)
end
return {1, #records}
"""

_DELETE_GROUP = r"""
-- ARGV: prefix, topic, group. Forgets the group, and the topic with its last group;
-- entries only this group still needed go. Its dead letters stay for inspection.
local c = ctx(ARGV[2], ARGV[3])
local groups = redis.pcall('XINFO', 'GROUPS', c.stream)
if type(groups) ~= 'table' or groups.err then groups = {} end
local mine, upto, others = nil, nil, 0
for _, info in ipairs(groups) do
  local g = hash(info)
  if g['name'] == c.G then
    mine = g
  else
    others = others + 1
    if upto == nil or id_less(g['last-delivered-id'], upto) then upto = g['last-delivered-id'] end
  end
end
local deleted = 0
if mine then
  local held = {}
  local start = '-'
  while true do
    local page = redis.call('XPENDING', c.stream, c.G, start, '+', 1000)
    for _, p in ipairs(page) do held[#held + 1] = p[1] end
    if #page < 1000 then break end
    start = '(' .. page[#page][1]
  end
  redis.call('XGROUP', 'DESTROY', c.stream, c.G)
  redis.call('HSET', c.tm, 'groups', #redis.call('XINFO', 'GROUPS', c.stream))
  if others == 0 then
    redis.call('DEL', c.stream, c.td, c.tm, c.idle, c.ic, c.ih)
    redis.call('SREM', P .. 'topics', c.T)
  else
    local function drop(id)
      if not needed_elsewhere(c, id) then
        redis.call('XDEL', c.stream, id)
        redis.call('ZREM', c.td, id)
      end
    end
    for _, id in ipairs(held) do drop(id) end
    -- What this group had not read yet and every other group has: nobody needs it now.
    local from = '(' .. mine['last-delivered-id']
    while id_less(mine['last-delivered-id'], upto) do
      local page = redis.call('XRANGE', c.stream, from, upto, 'COUNT', 1000)
      for _, e in ipairs(page) do drop(e[1]) end
      if #page < 1000 then break end
      from = '(' .. page[#page][1]
    end
  end
  deleted = 1
end
for _, key in ipairs(redis.call('SMEMBERS', c.keyset)) do redis.call('DEL', c.keys .. key) end
redis.call('DEL', c.keyset, c.meta, c.rstream, c.due, c.lease, c.pdue, c.fail)
return deleted
"""

_STATS = r"""
-- ARGV: prefix. Returns rows {topic, group ('' = none), ready, delayed, in_flight, dead_lettered}.
local now = now_ms()
local rows = {}
local dead = hash(redis.call('HGETALL', P .. 'dlqn'))
for _, T in ipairs(redis.call('SMEMBERS', P .. 'topics')) do
  local c = ctx(T)
  redis.call('ZREMRANGEBYSCORE', c.td, '-inf', now)
  local later = redis.call('ZRANGEBYSCORE', c.td, '(' .. now, '+inf')
  local groups = redis.pcall('XINFO', 'GROUPS', c.stream)
  if type(groups) ~= 'table' or groups.err then groups = {} end
  if #groups == 0 then
    local length = redis.call('XLEN', c.stream)
    rows[#rows + 1] = {T, '', length - #later, #later, 0, 0}
  end
  local added = tonumber(redis.call('HGET', c.tm, 'added') or '0')
  for _, info in ipairs(groups) do
    local i = hash(info)
    local g = ctx(T, i['name'])
    local meta = hash(redis.call('HGETALL', g.meta))
    local unread = added - tonumber(meta['base'] or added) - tonumber(meta['read'] or '0')
    unread = math.max(0, unread)
    local unread_later = 0
    for _, id in ipairs(later) do
      if id_less(i['last-delivered-id'], id) then unread_later = unread_later + 1 end
    end
    unread_later = math.min(unread, unread_later)
    local parked_later = 0
    for _, due in ipairs(redis.call('HVALS', g.pdue)) do
      if tonumber(due) > now then parked_later = parked_later + 1 end
    end
    local parked = math.max(0, tonumber(meta['parked'] or '0'))
    local in_flight = redis.call('ZCOUNT', g.lease, '(' .. now, '+inf')
    local expired = redis.call('ZCOUNT', g.lease, '-inf', now)
    local due_now = redis.call('ZCOUNT', g.due, '-inf', now)
    local due_later = redis.call('ZCOUNT', g.due, '(' .. now, '+inf')
    rows[#rows + 1] = {
      T, g.G,
      due_now + expired + (parked - parked_later) + (unread - unread_later),
      due_later + parked_later + unread_later,
      in_flight,
      tonumber(dead[T .. ' ' .. g.G] or '0'),
    }
  end
end
return rows
"""


BODIES = {
    "publish": _PUBLISH,
    "join": _JOIN,
    "fetch": _FETCH,
    "ack": _ACK,
    "nack": _NACK,
    "dead_letter": _DEAD_LETTER,
    "release": _RELEASE,
    "replay": _REPLAY,
    "stats": _STATS,
    "delete_group": _DELETE_GROUP,
}
