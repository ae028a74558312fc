-- ccworker's Redis fetch: pop up to N task messages and lease them, atomically.
--
-- kombu's Redis transport delivers one message per round trip (BRPOP) and
-- then records it as un-acked with a second one (a MULTI of ZADD
-- unacked_index + HSET unacked). This script does both for a whole batch in
-- one call and leaves exactly the state kombu leaves, so every kombu consumer
-- (a stock Celery worker too) treats messages held by ccworker as its own:
-- acked by deleting both entries, restored by anyone once the score is older
-- than visibility_timeout. It is also safer than kombu's two steps: a
-- message is never off its queue without being in `unacked`.
--
-- KEYS[1]    unacked        hash: delivery_tag -> JSON [payload, exchange, routing_key]
-- KEYS[2]    unacked_index  zset: delivery_tag scored with the lease time
-- KEYS[3..]  the queue lists, in the order to try them (priority steps
--            outer, queues inner: the order of kombu's BRPOP keys)
-- ARGV[1]    now: the score (seconds since the epoch, as kombu's time())
-- ARGV[2]    limit: at most this many messages (the free prefetch slots)
-- ARGV[3]    a message BRPOP already popped, to lease first ('' for none)
-- ARGV[4..]  delivery tags to acknowledge first (removed from both keys, as
--            kombu's ack does): acks ride along with the next fetch
--
-- Returns a flat list: payload1, tag1, payload2, tag2, ...
-- A payload kombu could not have leased either (not JSON, no string
-- properties.delivery_tag, no delivery_info exchange/routing_key) comes back
-- with an empty tag and is not recorded: the caller logs it and drops it, as
-- kombu's consumer loses such a message.

local unacked, index = KEYS[1], KEYS[2]
local now, limit, popped = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}

for i = 4, #ARGV do
    redis.call('ZREM', index, ARGV[i])
    redis.call('HDEL', unacked, ARGV[i])
end

local function lease(payload)
    local ok, message = pcall(cjson.decode, payload)
    local tag, info
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
        tag = message.properties.delivery_tag
        info = message.properties.delivery_info
    end
    if type(tag) ~= 'string' or tag == '' or type(info) ~= 'table'
            or info.exchange == nil or info.routing_key == nil then
        out[#out + 1] = payload
        out[#out + 1] = ''
        return
    end
    -- The payload is stored as received (never re-encoded), as kombu's
    -- dumps([message._raw, EX, RK]) would hold it.
    redis.call('ZADD', index, now, tag)
    redis.call('HSET', unacked, tag,
        '[' .. payload .. ', ' .. cjson.encode(info.exchange) .. ', '
            .. cjson.encode(info.routing_key) .. ']')
    out[#out + 1] = payload
    out[#out + 1] = tag
end

if popped ~= '' then
    lease(popped)
    limit = limit - 1
end

local key = 3
while limit > 0 and key <= #KEYS do
    local payload = redis.call('RPOP', KEYS[key])
    if payload then
        lease(payload)
        limit = limit - 1
    else
        key = key + 1
    end
end

return out
