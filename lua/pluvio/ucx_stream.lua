-- pluvio.ucx_stream: what a UCX worker receives, part of pluvio.ucx: Active
-- Message streams (worker:am_stream, stream:wait_msg), their messages
-- (data, recv_data, reply, release) and tag receives (worker:tag_recv).
-- Installed into pluvio.ucx, after ucx_endpoint.lua (replies send on
-- endpoints).
local pluvio = require "pluvio"
local core = require "pluvio.core"
local check = require "pluvio.check"

local ffi, C = core.ffi, core.C
local park, current_task, io_task = pluvio._park, pluvio._current_task, pluvio._io_task
local WAIT_STREAM = pluvio._WAIT_KIND.STREAM
local errstr = core.errstr
local ffi_string = ffi.string
local walk = next          -- walk tables with `for k, v in walk, t`, not pairs(): see task.lua
local type, format, setmetatable, getmetatable, tostring = type, string.format, setmetatable, getmetatable, tostring
local max = math.max
local band = require("bit").band

local M = {}

local EBADF, EAGAIN, EMFILE, EMSGSIZE, ENOTCONN, ECANCELED = -9, -11, -24, -90, -107, -125
local ENOMEM, ENOBUFS, EOPSFULL = -12, -105, -C.PL_EOPSFULL
local MAX_AM_ID = 255
local RESCUE_POLL = 0.001   -- s between looks at a killed tag receive still fetching its message
local Buffer = require("pluvio.uring").Buffer

function M.install(U)
    local I = U._internal
    local errname, why, fail, hold = I.errname, I.why, I.fail, I.hold
    local run_op, live_worker, live_workers, tag_value = I.run_op, I.live_worker, I.live_workers, I.tag_value
    local limbo_sweep, CLOSED = I.limbo_sweep, I.CLOSED
    local progress_note, collect_dropped, no_ep_room, start_send = I.progress_note, I.collect_dropped, I.no_ep_room, I.start_send
    local Worker, Endpoint, Stream, Message = U.Worker, U.Endpoint, U.Stream, U.Message

    -- am_stream(id[, {window = n}]): the stream of messages with AM id.  The
    -- window (default 64) is how many unread messages it holds before the
    -- sender is slowed.  Messages for the id that came before the stream was
    -- opened (held by the worker, up to 64) are its first.
    function Worker:am_stream(id, opts)
        live_worker("Worker:am_stream", self)
        check.integer("Worker:am_stream", "id", id, 0, MAX_AM_ID)
        local window = 64
        if type(opts) ~= "nil" then     -- (not ~= nil: a NULL pointer equals nil)
            if type(opts) ~= "table" then
                error("Worker:am_stream: options must be a table (got " .. type(opts) .. ")", 2)
            end
            for k, v in walk, opts do
                if k == "window" then
                    window = check.integer("Worker:am_stream", "window", v, 1, 1048576)
                else
                    error("Worker:am_stream: unknown option " .. check.show(k) .. " (known: window)", 2)
                end
            end
        end
        local rc = C.pl_ucx_stream_open(self.w, id, window)
        if rc < 0 then
            if rc == -17 then
                error(format("Worker:am_stream: a stream for AM id %d is already open on this worker", id), 2)
            end
            error("Worker:am_stream: " .. errstr(rc), 2)
        end
        local s = setmetatable({ worker = self, id = id, serial = rc, window = window, open = true }, Stream)
        self.streams[id] = s
        return s
    end

    -- Whether a killed tag receive whose op is still UCX's (its message, if
    -- it matched one, not kept yet: ucx.lua's take_rescued) may have matched
    -- a message that tag and mask match too: one tag both match.
    local function rescue_pending(w, tag, mask)
        local limbo = w.limbo
        for i = 1, #limbo do
            local r = limbo[i].rescue
            if r then
                local both = band(r.mask, mask)
                if band(r.tag, both) == band(tag, both) then
                    return true
                end
            end
        end
        return false
    end

    -- The first message killed tag receives had matched (in the order they
    -- matched them) whose tag matches tag in mask's bits: its data and tag,
    -- taken off the list; nil if none.
    local function take_tag_rescued(w, tag, mask)
        local rescued = w.tag_rescued
        local want = band(tag, mask)
        for i = 1, #rescued do
            local m = rescued[i]
            if band(m.tag, mask) == want then
                table.remove(rescued, i)
                return m.data, m.tag
            end
        end
        return nil
    end

    -- tag_recv(tag, mask, len_or_buf): receive a tagged message: with a length,
    -- returns the data as a string and the sender's tag; with a registered
    -- buffer, the byte count and the sender's tag.  A message that came
    -- already is received; else, once no peer can send to the worker (none
    -- at the call, or the last one goes while it waits): nil, err, "ENOTCONN".
    function Worker:tag_recv(tag, mask, len_or_buf)
        live_worker("Worker:tag_recv", self)
        tag = tag_value("Worker:tag_recv", "tag", tag)
        mask = tag_value("Worker:tag_recv", "mask", mask)
        local ptr, cap, scratch
        if getmetatable(len_or_buf) == Buffer then
            if not len_or_buf.base then
                error("Worker:tag_recv: len_or_buf is a registered buffer that was released", 2)
            end
            ptr, cap = len_or_buf.base, len_or_buf.len
        else
            check.integer("Worker:tag_recv", "len_or_buf", len_or_buf, 0, 2 ^ 31)
            cap = len_or_buf
        end
        local t = current_task("Worker:tag_recv")    -- it takes a message: check first
        local utag, umask = tag + 0ULL, mask + 0ULL
        if self.limbo[1] then
            limbo_sweep(self)       -- (takes what killed receives had matched)
            -- a killed receive may still be fetching a message it matched
            -- (rendezvous) that this one could take: that one goes first,
            -- as UCX would have it, else this receive would wait in UCX for
            -- a later one while it sat in tag_rescued
            while rescue_pending(self, utag, umask) do
                pluvio.sleep(RESCUE_POLL)
                if not self.w then
                    return fail("tag_recv", CLOSED)
                end
                limbo_sweep(self)
            end
        end
        if self.tag_rescued[1] then
            local data, stag = take_tag_rescued(self, utag, umask)
            if data then
                if #data > cap then
                    return fail(format("tag_recv: the message with tag 0x%x has %d bytes, more than the %d " ..
                                       "len_or_buf has room for (it is dropped)", stag, #data, cap), EMSGSIZE)
                elseif ptr then
                    ffi.copy(ptr, data, #data)
                    return #data, stag
                end
                return data, stag
            end
        end
        if not ptr then
            local err
            scratch, err = self.scratch:get(cap)
            if not scratch then
                return core.noted(core.no_scratch(cap), fail("tag_recv", err))
            end
            ptr = scratch.ptr
        end
        local seq = self.tag_posted + 1
        self.tag_posted = seq
        -- (a kill keeps the message it matched: ucx.lua's take_rescued)
        t.io_tag_ptr, t.io_tag_seq, t.io_tag, t.io_tag_mask = ptr, seq, utag, umask
        local rc, len, stag = run_op(self, t, C.pl_ucx_tag_recv(self.w, tag, mask, ptr, cap, t.slot, t.gen),
                                     "tag receive", scratch or len_or_buf)
        t.io_tag_ptr = nil
        if rc < 0 then             -- (scratch, if any, is left to the collector, as UCX may hold it)
            if rc == EMSGSIZE then  -- UCX reports the whole message's length and tag, and drops it
                return fail(format("tag_recv: the message with tag 0x%x has %d bytes, more than the %d " ..
                                   "len_or_buf has room for (it is dropped)", stag, len, cap), rc)
            elseif rc == ENOTCONN and len > 0 then    -- a rendezvous message whose sender went
                return nil, format("tag_recv: the message with tag 0x%x (%d bytes) came from an endpoint " ..
                                   "closed or failed since: its data cannot be fetched (it is dropped)",
                                   stag, len), "ENOTCONN"
            elseif rc == ENOTCONN then
                return nil, "tag_recv: no peer can send to this worker any more (every endpoint " ..
                            "failed or closed, no listener open, its address never handed out)", "ENOTCONN"
            end
            return fail("tag_recv", rc)
        end
        if scratch then
            local str = ffi_string(ptr, len)
            self.scratch:put(scratch)
            return str, stag
        end
        return len, stag
    end

    ---------------------------------------------------------------------------
    -- Streams and messages
    ---------------------------------------------------------------------------

    function Stream:describe()
        check.self("Stream:describe", self, Stream, "a stream")
        return format("AM stream %d%s", self.id, progress_note(self.worker))
    end

    function Stream:_abandon_wait(t)
        if self.open and self.worker.w then
            C.pl_ucx_stream_abandon(self.worker.w, self.id, t.slot, t.gen)
        end
    end

    -- A message belongs to the task that took it (wait_msg).  When that task
    -- is cancelled or fails, what it has neither received nor released is
    -- released (C knows each message's task): its rendezvous sender waits
    -- until then.  A task that returns may have handed its messages on (as
    -- results, through channels): they stay, and whoever has them receives
    -- or releases them.  Nothing is done per message but one field: a message
    -- consumed where it was taken never reaches the heap (the JIT sinks it),
    -- and tracking each one (a table entry, a finalizer) would cost that.
    local MsgOwner = {}     -- in the resources of each task that took messages

    function MsgOwner._task_exit(_, t)
        if t.final == "done" then
            return
        end
        for w in walk, live_workers do
            if w.w then
                C.pl_ucx_msgs_release_task(w.w, t.slot, t.gen)
            end
        end
    end

    -- Messages dropped without data/recv_data/release would stay held (UCX
    -- keeps their data, a rendezvous sender waits) until their task fails or
    -- the worker closes.  Once a worker's tasks hold more than TRACK_FROM taken
    -- messages, each new one is tracked: a weak table sees it collected, and a
    -- sweep releases what was collected, each time as many messages were
    -- tracked as the sweep before left (at least TRACK_FROM): its cost spreads
    -- over those.  A program that consumes its messages never gets there and
    -- pays nothing (its messages stay sunk by the JIT); one that drops them
    -- keeps at most TRACK_FROM untracked ones held.
    local TRACK_FROM = 256
    local weak_values = { __mode = "v" }

    local function sweep(w, tr)
        local objs, owners, n = tr.objs, tr.owners, 0
        for h, t in walk, owners do
            if objs[h] == nil then          -- collected while still held
                owners[h] = nil
                if w.w and C.pl_ucx_msg_drop(w.w, h, t.slot, t.gen) == 1 then
                    tr.collected = tr.collected + 1
                end
            else
                n = n + 1
            end
        end
        tr.n = n
        tr.added = 0
        tr.sweep_at = max(TRACK_FROM, n)
    end

    local function track(w, h, m, t)
        local tr = w.tracked
        if not tr then
            tr = { objs = setmetatable({}, weak_values), owners = {}, n = 0, added = 0,
                   sweep_at = TRACK_FROM, collected = 0 }
            w.tracked = tr
        end
        tr.objs[h] = m
        tr.owners[h] = t
        tr.n = tr.n + 1
        tr.added = tr.added + 1
        if tr.added > tr.sweep_at then
            sweep(w, tr)
        end
    end

    -- The message's data was taken or it was released: no longer tracked.
    local function untrack(w, h)
        local tr = w.tracked
        if tr and tr.owners[h] then
            tr.owners[h], tr.objs[h] = nil, nil
            tr.n = tr.n - 1
        end
    end

    -- The endpoint to answer message h on: one object per table entry, shared
    -- by the messages that came on it, held in C until the object is
    -- collected, so that the entry of a reply endpoint UCX made for a
    -- connect_addr peer goes once nothing refers to it.  Or -errno: why the
    -- message cannot be answered.  Once per entry, not per message.
    local function reply_endpoint(w, h)
        local ww, life = w.w, w.life
        local rh = C.pl_ucx_msg_reply_ep(ww, h)
        if rh == EMFILE then    -- (else it stays so: the message may be released before its reply)
            collect_dropped()
            rh = C.pl_ucx_msg_reply_ep(ww, h)
        end
        if rh < 0 then
            return rh
        end
        local ep = setmetatable({ worker = w, h = rh, peer = "the sender",
            hold = ffi.gc(ffi.new("char[1]"), function()    -- (refers to neither ep nor w)
                if life.open then C.pl_ucx_ep_unhold(ww, rh) end
            end) }, Endpoint)
        w.replies[rh] = ep
        return ep
    end

    -- The stream's next message, false when the task must wait (it was queued
    -- as a reader in C), or nil, err, code.
    local function next_msg(self, w, t)
        if not w.w then
            return nil, "wait_msg: the worker is closed", "ECANCELED"
        elseif not self.open then
            return nil, "wait_msg: the stream is closed", "EBADF"
        end
        local info = w.info
        local h = C.pl_ucx_stream_next(w.w, self.id, t.slot, t.gen, info)
        if h >= 0 then
            local hlen = info.header_length
            local reply = false     -- (false, not nil: see Message)
            if info.can_reply ~= 0 then
                local rh = info.ep
                reply = rh >= 0 and w.replies[rh] or reply_endpoint(w, h)
            end
            -- not "return setmetatable(...)": a tail call to a built-in with
            -- side effects makes the JIT give up on the return to the caller,
            -- and everything after a message arrives would run in the
            -- interpreter
            local m = setmetatable({
                worker = w, h = h,
                header = hlen > 0 and ffi_string(info.header, hlen) or "",
                len = info.data_length, rndv = info.rndv ~= 0,
                reply_ep = reply, owner = t,
            }, Message)
            if not t.takes_msgs then
                t.takes_msgs = true
                t:_own(MsgOwner)
            end
            if info.taken > TRACK_FROM then
                track(w, h, m, t)
            end
            return m
        elseif h == EAGAIN then
            return false
        elseif h == ENOTCONN then
            return nil, format("wait_msg: no peer can send to AM stream %d any more " ..
                               "(every endpoint failed or closed, no listener open)", self.id), "ENOTCONN"
        end
        return nil, "wait_msg: " .. errstr(h), errname(h)
    end

    local function park_reader(self, t, seq)
        t.wait_obj = self
        park(t, WAIT_STREAM, self.serial, self, "Stream:wait_msg", seq)
        t.wait_obj = nil
    end

    -- wait_msg(): the next message; parks until one arrives.  nil, err when
    -- the stream is closed or nothing can feed it any more (every endpoint
    -- failed or closed, and no listener open).  The usual paths (a message
    -- waiting, or one park) go through no loop: a loop entered on every call
    -- becomes a root trace of its own and breaks the caller's.
    function Stream:wait_msg()
        check.self("Stream:wait_msg", self, Stream, "a stream")
        local t = io_task("Stream:wait_msg")
        local w = self.worker
        local seq = t.io_seq
        local m, err, code = next_msg(self, w, t)
        if m ~= false then
            return m, err, code
        end
        park_reader(self, t, seq)
        m, err, code = next_msg(self, w, t)
        if m == false then      -- woken without a message for it (another reader took it)
            repeat
                park_reader(self, t, seq)
                m, err, code = next_msg(self, w, t)
            until m ~= false
        end
        return m, err, code
    end

    -- close(): stop receiving this id; held messages are released.
    function Stream:close()
        check.self("Stream:close", self, Stream, "a stream")
        if not self.open then
            return false
        end
        self.open = false
        if self.worker.w then
            C.pl_ucx_stream_close(self.worker.w, self.id)
        end
        self.worker.streams[self.id] = nil
        return true
    end

    local function live_msg(fname, m)
        check.self(fname, m, Message, "a message", 4)
        if not m.h then
            error(fname .. ": the message's data was already taken or released", 3)
        end
        if not m.worker.w then
            error(fname .. ": the worker is closed", 3)
        end
        local owner = m.owner
        if not owner.live and owner.final ~= "done" then
            m.h = nil
            error(format("%s: the message was released when %s, which took it, ended", fname,
                         tostring(owner)), 3)
        end
        return m
    end

    function Message:data_len()
        check.self("Message:data_len", self, Message, "a message")
        return self.len
    end

    function Message:is_rndv()
        check.self("Message:is_rndv", self, Message, "a message")
        return self.rndv
    end

    local function take(m, fname, ptr, cap, keep)
        local t = io_task(fname, 1)     -- (1: its errors name the caller of our caller)
        local w = m.worker
        local h = m.h
        local owner = w.tracked and w.tracked.owners[h]
        m.h = nil
        untrack(w, h)
        local op = C.pl_ucx_msg_recv(w.w, h, ptr, cap, t.slot, t.gen)
        if op == ENOMEM or op == EOPSFULL or op == ENOBUFS then
            -- the pull could not start (no op slot; no room): the message
            -- is as it was, to take again or release, not held in C for
            -- good with its rendezvous sender waiting.  (Only then: once it
            -- started, the message's slot is free, and after 128 more
            -- messages another one has the same handle: a pull that failed
            -- later gave this object that message, which its release freed
            -- while a stream still held it.)
            m.h = h
            if owner then
                track(w, h, m, owner)
            end
            return fail("receive AM data", op)
        end
        local rc = run_op(w, t, op, "AM data", keep)
        if rc < 0 then
            return fail("receive AM data", rc)
        end
        return m.len
    end

    -- Give the message back to C (and UCX what it holds for it), unless its
    -- worker or the task that took it ended (that released it), and stop
    -- tracking it.
    local function let_go(m)
        local h, w, owner = m.h, m.worker, m.owner
        if h then
            if w.w and (owner.live or owner.final == "done") then
                C.pl_ucx_msg_release(w.w, h)
            end
            untrack(w, h)
        end
        m.h = nil
    end

    -- Taken, then dropped by the runtime: see task.lua's drop_results.
    Message._result_dropped = let_go

    -- Handed by the task that took it (it returned the message) to the task
    -- that took its results (see task.lua's hand_results): that task's end
    -- releases it from now on.
    function Message._result_taken(m, t)
        local h, w = m.h, m.worker
        if h and w.w and m.owner ~= t and C.pl_ucx_msg_adopt(w.w, h, t.slot, t.gen) == 0 then
            m.owner = t
            local tr = w.tracked
            if tr and tr.owners[h] then
                tr.owners[h] = t
            end
            if not t.takes_msgs then
                t.takes_msgs = true
                t:_own(MsgOwner)
            end
        end
    end

    -- data(): the message's data as a string (pulls rendezvous data first).
    function Message:data()
        live_msg("Message:data", self)
        local w, h, len = self.worker, self.h, self.len
        local eager = len > 0 and not self.rndv and C.pl_ucx_msg_eager_data(w.w, h)
        if eager == nil then        -- (a NULL pointer: not held any more)
            eager = false
        end
        if len == 0 or eager then   -- straight from where UCX holds it
            local s = eager and ffi_string(eager, len) or ""
            let_go(self)
            return s
        end
        -- rendezvous: pulled into the worker's scratch memory (a task killed
        -- during a pull leaves its piece to UCX)
        local scratch, err = w.scratch:get(len)
        if not scratch then     -- (the message is as it was: to take again, or release)
            return core.noted(core.no_scratch(len), fail("receive AM data", err))
        end
        local n, err, code = take(self, "Message:data", scratch.ptr, len, scratch)
        if not n then
            return nil, err, code
        end
        local s = ffi_string(scratch.ptr, len)
        w.scratch:put(scratch)
        return s
    end

    -- recv_data(buf): the data straight into a registered buffer (rendezvous
    -- data goes there with no intermediate copy); returns the byte count.
    function Message:recv_data(buf)
        live_msg("Message:recv_data", self)
        if getmetatable(buf) ~= Buffer then
            error("Message:recv_data: buf must be a registered buffer (got " .. type(buf) .. ")", 2)
        end
        if not buf.base then
            error("Message:recv_data: buf is a registered buffer that was released", 2)
        end
        if buf.len < self.len then
            error(format("Message:recv_data: the buffer holds %d bytes, the message has %d", buf.len, self.len), 2)
        end
        local n, err, code = take(self, "Message:recv_data", buf.base, buf.len, buf)
        return n, err, code
    end

    -- release(): drop the message without reading its data.
    function Message:release()
        check.self("Message:release", self, Message, "a message")
        let_go(self)
        return true
    end

    -- reply(id, header, data[, need_reply, proto[, len]]): answer the sender (it must
    -- have sent with need_reply).
    function Message:reply(id, header, data, need_reply, proto, len)
        check.self("Message:reply", self, Message, "a message")
        local ep = self.reply_ep    -- an endpoint, -errno (gone before the message was taken) or false
        if not ep then
            error("Message:reply: the sender did not ask for a reply (need_reply was false)", 2)
        end
        local w = self.worker
        if not w.w then
            error("Message:reply: the worker is closed", 2)
        end
        local h = ep
        if type(ep) == "table" then
            h = ep.h
            local st = h and C.pl_ucx_ep_status(w.w, h)
            if not h or st == EBADF or st == ENOTCONN then
                -- the endpoint was closed after the message was taken (its entry
                -- is gone), or its close waits for operations in flight
                h = ENOTCONN
            end
        end
        if h < 0 then           -- the endpoint it came on was closed or failed since
            local msg, name = why(h)
            if h == ENOTCONN then
                msg = "the endpoint the message came on was closed"
            elseif h == EMFILE then     -- when the message was taken
                return no_ep_room(w, "am_send to the sender")
            end
            return nil, "am_send to the sender: " .. msg, name
        end
        -- (a tail call: errors name our caller's line, and Message:reply, not the
        -- Endpoint:am_send the user never called)
        return start_send("Message:reply", false, ep, id, header, data, need_reply, proto, len)
    end

    return M
end

return M
