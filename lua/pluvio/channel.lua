-- pluvio.channel: a bounded FIFO between tasks.  send parks while the
-- channel is full, recv parks while it is empty, try_send and try_recv
-- never park (full, empty); close wakes everyone.
-- Values are Lua values, so the buffer is a Lua ring; waking goes through
-- the runtime's C ready ring like every other wake-up.
local pluvio = require "pluvio"
local check = require "pluvio.check"

local park, wake, running_task = pluvio._park, pluvio._wake, pluvio._running_task
local runtime = pluvio.runtime
local WAIT = pluvio._WAIT_KIND
local C = require("pluvio.core").C
local format = string.format

local M = {}

local Channel = {}
Channel.__index = Channel
M.Channel = Channel

local MAX_CAPACITY = 2 ^ 31
-- The wait argument of a recv_any (a channel's own waits carry its
-- capacity): a wake-up from a channel it is queued on matches only that.
local ANY_ARG = -1

local function new_channel(fname, capacity, level)
    if type(capacity) == "nil" then     -- (not == nil: a NULL pointer equals nil)
        capacity = 1
    end
    if type(capacity) ~= "number" or capacity ~= capacity or capacity % 1 ~= 0
        or capacity < 1 or capacity > MAX_CAPACITY then
        error(format("%s: capacity must be an integer from 1 to %d (got %s)",
                     fname, MAX_CAPACITY, check.show(capacity)), level)
    end
    return setmetatable({
        cap = capacity, buf = {}, head = 1, count = 0, closed = false,
        -- waiting tasks, FIFO: arrays with a read index
        recvq = {}, recv_head = 1, recv_tail = 0, sendq = {}, send_head = 1, send_tail = 0,
        sent = 0, received = 0,
    }, Channel)
end

-- new(capacity): capacity is an integer >= 1 (how many values it holds
-- before send parks); default 1.
function M.new(capacity)
    local ch = new_channel("channel.new", capacity, 3)
    return ch
end

-- For pluvio.channel, one call deeper.
function M._new(capacity, level)
    local ch = new_channel("pluvio.channel", capacity, level + 1)
    return ch
end

-- Wake the first task of q still parked here (kind: its wait).  An entry
-- whose task does not wait so was left by a plain coroutine inside that
-- task (its wait yielded to the coroutine's resumer, not to the loop): it
-- is dropped, or the wake would go to whatever the task waits on now and
-- the value would sit here with every real waiter asleep.  A task of
-- another runtime than the running one (an outer one, paused while this
-- nested one runs; one a block_on left, which may never run again) is
-- woken but takes no turn: the next one is woken too, else a receiver
-- that could run waited with a value in the channel (a false deadlock).
local function wake_first(ch, q, head, kind)
    local now = runtime()
    local t = q[head]
    while t do
        q[head] = nil
        head = head + 1
        local mark = t.parked_on
        if t.live and (mark == ch or mark ~= nil and rawget(mark, ch)) then
            local arg = ch.cap
            if mark == ch then
                t.parked_on = nil
            else    -- a recv_any: queued on its other channels until it runs
                arg = ANY_ARG
            end
            if C.pl_task_wake_waiting(t.rt.crt, t.slot, t.gen, kind, arg) == 1 then
                t.baton = ch      -- if t dies before it runs, it passes the wake on
                if t.rt == now then
                    now.turns[t] = true     -- (passed on if now stops running first)
                    return head
                end
            end
        end
        t = q[head]
    end
    return head
end

local function wake_all(ch, q, head)
    local t = q[head]
    while t do
        q[head] = nil
        head = head + 1
        if t.parked_on == ch then   -- (a recv_any's mark stays: it leaves its other queues itself)
            t.parked_on = nil
        end
        wake(t)
        t = q[head]
    end
    return head
end

function Channel:describe()
    check.self("Channel:describe", self, Channel, "a channel")
    return format("channel (%d/%d%s)", self.count, self.cap, self.closed and ", closed" or "")
end

-- The running task took up the turn it was woken for (if it was).
local function take_turn(t)
    if t.baton then
        t.baton = nil
        t.rt.turns[t] = nil
    end
end

-- A task is queued on at most one channel, in one queue, once, and only
-- while marked so (t.parked_on): a wait leaves the queue it is marked on
-- when it starts and when it ends.  A mark found at the start (on this
-- channel or another) was left by a plain coroutine of the task, whose
-- wait yielded to the coroutine's resumer, not to the loop (and raised if
-- that resumed it).  One found at the end: a wake from elsewhere
-- (Task:wake) ended the wait while still queued.  Left there, the entry
-- stayed unmarked, and once the task waited on that channel's other side
-- a wake walking past the stale entry took the mark of the real wait:
-- that send was never woken (a false deadlock).  A loop of abandoned
-- coroutines receiving on two channels grew a queue without bound.
local function leave_queue(t)
    local ch = t.parked_on
    if ch then
        t.parked_on = nil
        ch:_leave(t)
    end
end

-- Queue v (there is room) and wake the oldest parked receiver.
local function put(self, v)
    local n = self.count
    self.buf[(self.head + n - 1) % self.cap + 1] = v
    self.count = n + 1
    self.sent = self.sent + 1
    if self.recvq[self.recv_head] then
        self.recv_head = wake_first(self, self.recvq, self.recv_head, WAIT.CHANNEL_RECV)
    end
    return true
end

-- The oldest value (there is one); wakes the oldest parked sender.
local function take(self)
    local h = self.head
    local v = self.buf[h]
    self.buf[h] = nil
    self.head = h % self.cap + 1
    self.count = self.count - 1
    self.received = self.received + 1
    if self.sendq[self.send_head] then
        self.send_head = wake_first(self, self.sendq, self.send_head, WAIT.CHANNEL_SEND)
    end
    return v
end

-- A value a receiver would take for the channel's end: nil, and a NULL
-- pointer, which equals nil (raises at the sender's caller).
local function no_nil(fname, v)
    if type(v) == "nil" then
        error(fname .. ": value must not be nil (recv returns nil only when closed)", 3)
    end
    error(fname .. ": value must not be a NULL pointer, which equals nil (recv returns nil only when " ..
          "closed): send a sentinel of your own instead", 3)
end

-- send(v): queue v (not nil); parks while the channel is full.  Sending on a
-- closed channel raises.
function Channel:send(v)
    check.self("Channel:send", self, Channel, "a channel")
    if v == nil then
        no_nil("Channel:send", v)
    end
    if self.closed then
        error("Channel:send: the channel is closed", 2)
    end
    if self.count >= self.cap then
        local t = running_task("Channel:send")
        leave_queue(t)
        repeat
            if t.parked_on ~= self then
                t.parked_on = self
                self.send_tail = self.send_tail + 1
                self.sendq[self.send_tail] = t
            end
            park(t, WAIT.CHANNEL_SEND, self.cap, self, "Channel:send")
            take_turn(t)
            if self.closed then
                leave_queue(t)
                error("Channel:send: the channel was closed while this send waited " ..
                      "(the value was not delivered)", 2)
            end
        until self.count < self.cap
        leave_queue(t)
    end
    return put(self, v)
end

-- recv(): the oldest value; parks while empty; nil, "closed" once the
-- channel is closed and drained.
function Channel:recv()
    check.self("Channel:recv", self, Channel, "a channel")
    if self.count == 0 then
        if self.closed then
            return nil, "closed"
        end
        local t = running_task("Channel:recv")
        leave_queue(t)
        repeat
            if t.parked_on ~= self then
                t.parked_on = self
                self.recv_tail = self.recv_tail + 1
                self.recvq[self.recv_tail] = t
            end
            park(t, WAIT.CHANNEL_RECV, self.cap, self, "Channel:recv")
            take_turn(t)
            if self.count == 0 and self.closed then
                leave_queue(t)
                return nil, "closed"
            end
        until self.count > 0
        leave_queue(t)
    end
    return take(self)
end

-- try_send(v): queue v if the channel has room (true), else false, "full"
-- at once.  Raises as send does for nil and a closed channel.
function Channel:try_send(v)
    check.self("Channel:try_send", self, Channel, "a channel")
    if v == nil then
        no_nil("Channel:try_send", v)
    end
    if self.closed then
        error("Channel:try_send: the channel is closed", 2)
    end
    if self.count >= self.cap then
        return false, "full"
    end
    return put(self, v)
end

-- try_recv(): the oldest value if there is one, else nil, "empty" at once
-- (nil, "closed" once the channel is closed and drained).
function Channel:try_recv()
    check.self("Channel:try_recv", self, Channel, "a channel")
    if self.count == 0 then
        return nil, self.closed and "closed" or "empty"
    end
    return take(self)
end

-- close(): no more sends; receivers drain what is buffered, then get
-- nil, "closed".  Closing twice is harmless.
function Channel:close()
    check.self("Channel:close", self, Channel, "a channel")
    if self.closed then
        return false
    end
    self.closed = true
    self.recv_head = wake_all(self, self.recvq, self.recv_head)
    self.send_head = wake_all(self, self.sendq, self.send_head)
    return true
end

-- A task chosen by a wake-up died before it could use it: wake the next
-- waiter on each side that can make progress now.
function Channel:_pass_baton()
    if self.count > 0 or self.closed then
        self.recv_head = wake_first(self, self.recvq, self.recv_head, WAIT.CHANNEL_RECV)
    end
    if self.count < self.cap or self.closed then
        self.send_head = wake_first(self, self.sendq, self.send_head, WAIT.CHANNEL_SEND)
    end
end

-- Take t out of a queue of waiters; returns the queue's new head and tail.
local function leave(q, head, tail, t)
    if q[head] == t then
        q[head] = nil
        return head + 1, tail
    end
    for i = head + 1, tail do
        if q[i] == t then
            for k = i, tail - 1 do
                q[k] = q[k + 1]
            end
            q[tail] = nil
            return head, tail - 1
        end
    end
    return head, tail
end

-- A task parked here ended (killed, timed out, cancelled with its
-- runtime): it leaves the queue at once.  Left there, it stayed until a
-- wake-up walked past it, so a channel polled with pluvio.timeout while
-- idle kept every timed-out receiver (and its task) for as long.
function Channel:_leave(t)
    self.recv_head, self.recv_tail = leave(self.recvq, self.recv_head, self.recv_tail, t)
    self.send_head, self.send_tail = leave(self.sendq, self.send_head, self.send_tail, t)
end

-- recv_any: a task waiting on several channels at once is queued with the
-- receivers of each, marked with the set of them (t.parked_on): its
-- channels in argument order, and each channel as a key.  A wake-up from
-- one of them leaves the task queued on the others until it runs: then it
-- leaves them all (and queues again if it must wait on).
local AnyWait = {}
AnyWait.__index = AnyWait

function AnyWait:_leave(t)
    for i = 1, #self do
        self[i]:_leave(t)
    end
end

function AnyWait:describe()
    local parts = {}
    for i = 1, #self do
        parts[i] = self[i]:describe()
    end
    return "recv_any of " .. table.concat(parts, ", ")
end

-- The first channel of chans (1..n) with a value; 0 when every one is
-- closed and drained; nil when the caller must wait.
local function first_ready(chans, n)
    local open = false
    for i = 1, n do
        local ch = chans[i]
        if ch.count > 0 then
            return i
        end
        open = open or not ch.closed
    end
    if not open then
        return 0
    end
end

-- recv_any(ch1, ch2, ...): the oldest value of the first channel, in
-- argument order, that has one, as i, value.  A closed and drained channel
-- is passed over (else a loop over channels that end one by one would spin
-- on the first to end); nil, "closed" once they all are.  Parks while every
-- channel is empty.  level: for errors, the user's frame seen from here.
function M._recv_any(level, ...)
    local n = select("#", ...)
    if n == 0 then
        error("pluvio.recv_any: give at least one channel", level)
    end
    local chans = { ... }
    for i = 1, n do
        local ch = chans[i]
        if getmetatable(ch) ~= Channel then
            error(format("pluvio.recv_any: argument %d must be a channel (got %s)", i, check.show(ch)), level)
        end
        for k = 1, i - 1 do
            if chans[k] == ch then
                error(format("pluvio.recv_any: argument %d is the same channel as argument %d", i, k), level)
            end
        end
    end
    local i = first_ready(chans, n)
    if not i then
        local t = running_task("pluvio.recv_any", 1)   -- (pluvio.recv_any calls us)
        local set = setmetatable(chans, AnyWait)
        for k = 1, n do
            set[chans[k]] = true
        end
        repeat
            leave_queue(t)          -- (all of them: a wake-up took it out of one)
            t.parked_on = set
            for k = 1, n do
                local ch = chans[k]
                if not ch.closed then   -- (a closed one gets no more values)
                    ch.recv_tail = ch.recv_tail + 1
                    ch.recvq[ch.recv_tail] = t
                end
            end
            park(t, WAIT.CHANNEL_RECV, ANY_ARG, set, "pluvio.recv_any")
            local woken_by = t.baton
            take_turn(t)
            i = first_ready(chans, n)
            -- woken by a channel that still holds a value, but taking one of
            -- an earlier channel: the turn goes on to its next receiver
            if woken_by and i and woken_by ~= chans[i] and woken_by.count > 0 then
                woken_by.recv_head = wake_first(woken_by, woken_by.recvq, woken_by.recv_head,
                                                WAIT.CHANNEL_RECV)
            end
        until i
        leave_queue(t)
    end
    if i == 0 then
        return nil, "closed"
    end
    return i, take(chans[i])
end

function Channel:len()
    check.self("Channel:len", self, Channel, "a channel")
    return self.count
end

function Channel:capacity()
    check.self("Channel:capacity", self, Channel, "a channel")
    return self.cap
end

function Channel:is_closed()
    check.self("Channel:is_closed", self, Channel, "a channel")
    return self.closed
end

return M
