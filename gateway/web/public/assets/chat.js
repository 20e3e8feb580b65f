// The chat client without the page: one WebSocket with reconnects, the REST
// calls, each chat's messages in seq order, sends until acked, and typing.
// The page (app.js) listens to its 'change' events and draws what it holds.
//
// The rules it keeps (../../../../shared/protocol.md):
// - every message is kept once, by id, and shown in seq order;
// - a chat that is open ("loaded") has a head: the newest message up to
//   which we hold everything the server has. A message past head + 1 is a
//   gap: history `after=<head>` fills it at once;
// - when the socket closes (1001 from a draining node, a dead network...),
//   it reconnects with exponential backoff and jitter, then catches every
//   loaded chat up from `after=<head>`, and resends every send that got no
//   `ack` with the same id (the server acks a resent id with its first seq).

import { privateChatId, uuidv7 } from './ids.js';

/** Backoff of reconnects: the first waits 250–500 ms, then doubling to 15 s. */
export const BACKOFF = { baseMs: 500, maxMs: 15000 };
/** History page sizes: opening and "load older"; catching up. */
export const PAGE = 50;
export const CATCH_UP_PAGE = 500;
/**
 * Catching up while history lags what we were told live: asked again after
 * firstMs, doubling, `tries` times (about 19 s: a hole for good is passed
 * by history about 11 s after the next message); then once after recheckMs, doubling up
 * to maxRecheckMs while history does not move on, while connected (a new
 * live message starts the quick tries again). History
 * never passes a message still on its way to storage and passes a hole for
 * good by itself once a later message is stored, so the client never skips
 * a hole on its own.
 */
export const LAG = { firstMs: 150, tries: 7, recheckMs: 15000, maxRecheckMs: 600000 };
/** A send with no ack this long means the socket is dead: reconnect. */
export const ACK_TIMEOUT_MS = 10000;
/** Application-level ping, and how long a pong may take. */
export const PING_EVERY_MS = 25000;
export const PONG_TIMEOUT_MS = 10000;
/**
 * Typing: at most one event per second, the first 300 ms after a key. The
 * spacing has a margin: the server drops an event that arrives within its
 * 1 s window of the previous one, and network jitter may bring two events
 * sent exactly 1 s apart closer together.
 */
export const TYPING_EVERY_MS = 1100;
export const TYPING_DEBOUNCE_MS = 300;
/** A peer's typing indicator lasts this long after its last event. */
export const TYPING_SHOWN_MS = 3000;
/** `unavailable` and `rate_limited` answers to a send are retried this often. */
export const SEND_RETRIES = 5;

/** The delay before reconnect attempt `attempt` (0, 1, ...): full backoff halved plus jitter. */
export function backoffDelay(attempt, random = Math.random) {
  const cap = Math.min(BACKOFF.maxMs, BACKOFF.baseMs * 2 ** Math.min(attempt, 16));
  return Math.round(cap / 2 + random() * (cap / 2));
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

/**
 * One chat as the client knows it. `msgs` maps id to message; `bySeq`
 * maps seq to the confirmed ones.
 */
export class ChatState {
  constructor(id, info = {}) {
    this.id = id;
    this.kind = info.kind || 'group';
    this.title = info.title || '';
    this.visibility = info.visibility || 'private';
    this.members = info.members || [];
    this.listed = false; // seen in GET /v1/chats
    this.loaded = false; // history read: head is meaningful
    this.head = null; // {id, seq}: everything up to it is here
    this.oldestReached = false;
    this.msgs = new Map();
    this.bySeq = new Map();
    this.unread = 0;
    this.typing = new Map(); // user -> time the indicator ends
    this.catching = null; // the running catch-up, a promise
    this.loading = null; // the first read of history, a promise
    this.catchAgain = false;
    this.catchRetry = null; // timer of the next try after a failed or lagging catch-up
    this.catchFailures = 0;
    this.lagRechecks = 0; // rechecks in a row that found history still behind
  }

  /** Confirmed messages in seq order, then our unconfirmed sends in send order. */
  ordered() {
    const confirmed = [];
    const pending = [];
    for (const m of this.msgs.values()) (m.seq == null ? pending : confirmed).push(m);
    confirmed.sort((a, b) => a.seq - b.seq);
    pending.sort((a, b) => a.sentAt - b.sentAt);
    return confirmed.concat(pending);
  }

  maxSeq() {
    let max = 0;
    for (const seq of this.bySeq.keys()) if (seq > max) max = seq;
    return max;
  }

  minConfirmed() {
    let min = null;
    for (const m of this.bySeq.values()) if (min === null || m.seq < min.seq) min = m;
    return min;
  }

  /**
   * Adds or updates a confirmed message (from the server: live, history or
   * an ack). Returns true when it is new to us.
   */
  put(m) {
    const known = this.msgs.get(m.id);
    if (known && known.seq != null) return false;
    const merged = known ? { ...known, ...m, state: 'sent', error: null } : { ...m, state: 'sent' };
    this.msgs.set(m.id, merged);
    this.bySeq.set(m.seq, merged);
    return !known;
  }

  /** Moves head over the messages that follow it without a hole. */
  advanceHead() {
    if (!this.head) return;
    for (let next = this.bySeq.get(this.head.seq + 1); next; next = this.bySeq.get(this.head.seq + 1)) {
      this.head = { id: next.id, seq: next.seq };
    }
  }

  /** True when we hold a message past head + 1: a gap to fill from history. */
  hasGap() {
    if (!this.loaded) return false;
    const max = this.maxSeq();
    return this.head ? max > this.head.seq : max > 0;
  }
}

export class ChatClient extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.base        http(s) origin of the gateway or load balancer
   * @param {{token: string, user: string}} o.session
   * @param {() => Promise<string|null>} [o.renew]  a fresh token after a 401 or close 4001
   * @param {typeof WebSocket} [o.WebSocket]
   * @param {typeof fetch} [o.fetch]
   * @param {typeof LAG} [o.lag]
   */
  constructor({ base, session, renew, WebSocket: WS, fetch: fetchImpl, lag = LAG }) {
    super();
    this.lag = lag;
    this.base = base.replace(/\/$/, '');
    this.token = session.token;
    this.me = session.user;
    this.renew = renew || (async () => null);
    this.WS = WS || globalThis.WebSocket;
    this.fetchImpl = fetchImpl || globalThis.fetch.bind(globalThis);
    this.chats = new Map();
    this.outbox = new Map(); // message id -> {chat, to, body, tries}
    this.status = 'offline'; // connecting | online | reconnecting | offline
    this.retryAt = null; // when the next reconnect attempt starts (ms)
    this.ws = null;
    this.attempt = 0;
    this.connectedOnce = false;
    this.stopped = true;
    this.timers = new Set();
    this.typingTimer = null;
    this.typingTarget = null;
    this.lastTypingSent = 0;
    this.notice = null; // the latest error worth showing, {text, at}
    this.lastClose = null; // close code of the last socket (1001: its node was shutting down)
    this.listRead = 0; // the latest chat list read started
    this.listChanges = 0; // local changes of the list (a group created, a chat left)
    this.listChain = 0; // the latest refreshChatsUntilDone; older ones stop retrying
  }

  // --- plumbing -----------------------------------------------------------

  emit(what, detail = {}) {
    this.dispatchEvent(new CustomEvent('change', { detail: { what, ...detail } }));
  }

  later(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  cancel(t) {
    if (t == null) return;
    clearTimeout(t);
    this.timers.delete(t);
  }

  setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.emit('status');
  }

  setNotice(text) {
    this.notice = { text, at: Date.now() };
    this.emit('notice');
  }

  chat(id, info) {
    let c = this.chats.get(id);
    if (!c) {
      c = new ChatState(id, info);
      this.chats.set(id, c);
    }
    return c;
  }

  /** The other user of a private chat (ourselves in a chat with ourselves). */
  peerOf(chat) {
    return chat.members.find((u) => u !== this.me) || this.me;
  }

  // --- REST ---------------------------------------------------------------

  async api(path, { method = 'GET', body, retried = false } = {}) {
    const headers = { authorization: `Bearer ${this.token}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await this.fetchImpl(`${this.base}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401 && !retried && (await this.renewToken())) {
      return this.api(path, { method, body, retried: true });
    }
    if (!res.ok) {
      let code = null;
      let message = null;
      try {
        ({ code, message } = await res.json());
      } catch {
        /* not JSON */
      }
      throw new ApiError(res.status, code, message);
    }
    return res.status === 204 ? null : res.json();
  }

  async renewToken() {
    try {
      const token = await this.renew();
      if (token) {
        this.token = token;
        return true;
      }
    } catch {
      /* keep the old one */
    }
    return false;
  }

  async refreshChats() {
    const read = ++this.listRead;
    const changes = this.listChanges;
    const list = await this.api('/v1/chats');
    // A read started later answers instead of this one.
    if (read !== this.listRead) return undefined;
    // A group created or a chat left meanwhile: this answer may not know it
    // (applied, it would drop the new group or bring the left chat back), and
    // it may know something else new: read again.
    if (changes !== this.listChanges) return this.refreshChats();
    const seen = new Set();
    for (const info of list) {
      const c = this.chat(info.id, info);
      Object.assign(c, {
        kind: info.kind || c.kind,
        title: info.title ?? c.title,
        visibility: info.visibility ?? c.visibility,
        members: info.members && info.members.length ? info.members : c.members,
        listed: true,
      });
      seen.add(info.id);
    }
    // Chats we left, or were removed from, go; a private chat we opened
    // but have not written in yet stays.
    for (const [id, c] of this.chats) {
      if (!seen.has(id) && c.listed) this.chats.delete(id);
    }
    this.emit('chats');
  }

  /** refreshChats, tried again (while connected) until it works; a newer call takes over the retries. */
  refreshChatsUntilDone(attempt = 0, chain = ++this.listChain) {
    this.refreshChats().catch(() => {
      if (!this.ws || chain !== this.listChain) return;
      this.later(Math.min(2000, backoffDelay(attempt)), () => this.refreshChatsUntilDone(attempt + 1, chain));
    });
  }

  async createGroup(title, visibility, members = []) {
    const created = await this.api('/v1/chats', { method: 'POST', body: { title, visibility, members } });
    const c = this.chat(created.id, { ...created, kind: 'group' });
    c.listed = true;
    this.listChanges++;
    this.emit('chats');
    return c;
  }

  async addMember(chatId, user) {
    await this.api(`/v1/chats/${chatId}/members`, { method: 'POST', body: { user } });
  }

  async leave(chatId) {
    await this.api(`/v1/chats/${chatId}/members/${this.me}`, { method: 'DELETE' });
    this.chats.delete(chatId);
    this.listChanges++;
    this.emit('chats');
  }

  /** Opens (locally) the private chat with `user`; it exists on the server after the first message. */
  openDirect(user) {
    const id = privateChatId(this.me, user);
    const c = this.chat(id, { kind: 'direct', members: [this.me, user].sort() });
    this.emit('chats');
    return c;
  }

  history(chatId, query) {
    const q = new URLSearchParams(query).toString();
    return this.api(`/v1/chats/${chatId}/messages?${q}`).then((r) => r.messages);
  }

  /** Reads a chat's latest page; from then on the chat is kept gap-free. */
  load(chatId) {
    const c = this.chat(chatId);
    if (c.loaded) return Promise.resolve(c);
    if (!c.loading) {
      c.loading = this.readLatest(c).finally(() => {
        c.loading = null;
      });
    }
    return c.loading;
  }

  async readLatest(c) {
    const chatId = c.id;
    let page;
    try {
      page = await this.history(chatId, { limit: PAGE });
    } catch (e) {
      // A private chat nobody has written in yet does not exist.
      if (e.status === 404 && c.kind === 'direct') page = [];
      else throw e;
    }
    // Messages that came live before the chat was read, older than this
    // page, may have holes below them: drop them; "load older" reads them.
    if (page.length) {
      for (const [seq, m] of c.bySeq) {
        if (seq < page[0].seq) {
          c.bySeq.delete(seq);
          c.msgs.delete(m.id);
        }
      }
    }
    for (const m of page) this.acceptStored(c, m);
    if (!c.loaded) {
      c.loaded = true;
      // The head goes as far as the page is unbroken: a latest page is
      // served as stored, so a hole in it may be a message still on its way,
      // which catching up from before it asks for (history answers a window
      // after a cursor only up to such a message).
      c.head = page.length ? { id: page[0].id, seq: page[0].seq } : null;
      c.oldestReached = page.length < PAGE;
      c.advanceHead();
    }
    this.emit('messages', { chat: chatId });
    if (c.hasGap()) this.catchUp(c);
    return c;
  }

  /** "Load older": the page before the oldest message we hold. */
  async loadOlder(chatId) {
    const c = this.chat(chatId);
    const oldest = c.minConfirmed();
    if (!oldest) {
      c.oldestReached = true;
      this.emit('messages', { chat: chatId });
      return 0;
    }
    const page = await this.history(chatId, { before: oldest.id, limit: PAGE });
    let added = 0;
    for (const m of page) if (this.acceptStored(c, m)) added++;
    if (page.length < PAGE) c.oldestReached = true;
    this.emit('messages', { chat: chatId, older: true });
    return added;
  }

  /** A message from history: also settles a send of ours that the server has. */
  acceptStored(c, m) {
    const pending = this.outbox.get(m.id);
    if (pending) {
      this.outbox.delete(m.id);
      this.cancel(pending.timer);
    }
    return c.put(m);
  }

  /**
   * Brings a loaded chat up to date from `after=<head>`, page by page. When
   * we hold messages the server does not list yet (history may lag live
   * delivery), it asks again a few times, then rechecks (`LAG`); a recheck
   * asks once.
   */
  catchUp(c, recheck = false) {
    if (!c.loaded) return Promise.resolve();
    if (c.catching) {
      c.catchAgain = true;
      return c.catching;
    }
    this.cancel(c.catchRetry);
    c.catching = (async () => {
      let lagRetries = recheck ? this.lag.tries : 0;
      let failed = false;
      let lagging = false;
      const headBefore = c.head ? c.head.seq : 0;
      try {
        for (;;) {
          const cursor = c.head;
          const query = cursor ? { after: cursor.id, limit: CATCH_UP_PAGE } : { limit: CATCH_UP_PAGE };
          const page = await this.history(c.id, query);
          for (const m of page) this.acceptStored(c, m);
          const last = page[page.length - 1];
          if (cursor) {
            // A page after a cursor is all the server has there: it never
            // passes a message still on its way, so holes before its last
            // message are for good.
            if (last && last.seq > cursor.seq) c.head = { id: last.id, seq: last.seq };
            c.advanceHead();
          } else if (page.length) {
            // The latest messages, served as stored: the head goes as far as
            // the page itself is unbroken. Not over what we hold beyond it
            // unless the page reaches it: after a 400 we may hold messages
            // the server lost, and the head must not land on one again.
            let at = 0;
            while (at + 1 < page.length && page[at + 1].seq === page[at].seq + 1) at++;
            c.head = { id: page[at].id, seq: page[at].seq };
            if (at === page.length - 1) c.advanceHead();
          }
          this.emit('messages', { chat: c.id });
          if (page.length === CATCH_UP_PAGE) continue;
          if (!c.hasGap()) break;
          if (lagRetries >= this.lag.tries) {
            // A message still on its way to storage, or one that keeps
            // failing: ask again later rather than skip it.
            lagging = true;
            break;
          }
          await new Promise((r) => this.later(this.lag.firstMs * 2 ** lagRetries++, r));
        }
        c.catchFailures = 0;
      } catch (e) {
        if (e instanceof ApiError && e.status === 400 && c.head) {
          // The cursor is unknown to the server (its Redis lost it?): it is
          // no message of the chat, so it goes, and the catch-up starts
          // over from the latest page (which must not lead back onto it).
          c.bySeq.delete(c.head.seq);
          c.msgs.delete(c.head.id);
          c.head = null;
          c.catchAgain = true;
        } else if (!(e instanceof ApiError && (e.status === 403 || e.status === 404))) {
          // The network, or a 502/503 from the load balancer while a node
          // is down: try again soon (a reconnect catches up anyway).
          failed = true;
        }
      } finally {
        c.catching = null;
        // History moved on, or caught up: the next recheck comes soon again.
        if ((!lagging && !failed) || (c.head ? c.head.seq : 0) > headBefore) c.lagRechecks = 0;
        if (failed && this.ws) {
          c.catchRetry = this.later(Math.min(2000, backoffDelay(c.catchFailures++)), () => this.catchUp(c));
        } else if (lagging && this.ws) {
          const wait = Math.min(this.lag.maxRecheckMs, this.lag.recheckMs * 2 ** c.lagRechecks++);
          c.catchRetry = this.later(wait, () => this.catchUp(c, true));
        }
        if (c.catchAgain) {
          c.catchAgain = false;
          this.catchUp(c);
        }
      }
    })();
    return c.catching;
  }

  // --- the socket ---------------------------------------------------------

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.typingTimer = null;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, 'bye');
    }
    this.setStatus('offline');
  }

  /** Reconnect now instead of waiting out the backoff. */
  reconnectNow() {
    if (this.stopped || this.ws) return;
    this.cancel(this.reconnectTimer);
    this.connect();
  }

  connect() {
    this.retryAt = null;
    this.setStatus(this.connectedOnce ? 'reconnecting' : 'connecting');
    const url = `${this.base.replace(/^http/, 'ws')}/v1/ws?token=${encodeURIComponent(this.token)}`;
    let ws;
    try {
      ws = new this.WS(url);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      this.connectedOnce = true;
      this.setStatus('online');
      // A connection that lasts resets the backoff; one that drops at once does not.
      this.stableTimer = this.later(3000, () => {
        this.attempt = 0;
      });
      this.schedulePing();
      this.onOpen();
    };
    ws.onmessage = (e) => {
      if (this.ws === ws) this.onFrame(e.data);
    };
    ws.onerror = () => {};
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.cancel(this.stableTimer);
      this.cancel(this.pingTimer);
      this.cancel(this.pongTimer);
      this.onClose(e.code, opened);
    };
  }

  async onClose(code, opened) {
    if (this.stopped) return;
    this.lastClose = code;
    for (const [id, o] of this.outbox) {
      this.cancel(o.timer);
      this.markSend(id, 'queued');
    }
    for (const c of this.chats.values()) c.typing.clear();
    this.emit('typing');
    this.setStatus('offline');
    // 4001: the token expired. A handshake that never opened may have been
    // refused with 401: ask the REST API, which says so plainly.
    if (code === 4001) {
      await this.renewToken();
    } else if (!opened) {
      try {
        await this.api('/v1/chats');
      } catch {
        /* api() renewed the token on a 401; anything else: just retry */
      }
    }
    if (!this.stopped) this.scheduleReconnect();
  }

  scheduleReconnect() {
    const delay = backoffDelay(this.attempt++);
    this.retryAt = Date.now() + delay;
    this.setStatus('offline');
    this.emit('status');
    this.cancel(this.reconnectTimer);
    this.reconnectTimer = this.later(delay, () => this.connect());
  }

  schedulePing() {
    this.pingTimer = this.later(PING_EVERY_MS, () => {
      if (!this.ws) return;
      this.raw({ type: 'ping', ref: `ping-${Date.now()}` });
      this.pongTimer = this.later(PONG_TIMEOUT_MS, () => this.drop('no pong'));
      this.schedulePing();
    });
  }

  /** Gives up on the current socket (it looks dead) and reconnects. */
  drop(why) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    try {
      ws.close(4000, why);
    } catch {
      /* already closing */
    }
    this.cancel(this.stableTimer);
    this.cancel(this.pingTimer);
    this.cancel(this.pongTimer);
    this.onClose(4000, true);
  }

  raw(event) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(event));
    return true;
  }

  async onOpen() {
    // Resend first: the server acks an id it already has with its first seq.
    for (const id of this.outbox.keys()) this.transmit(id);
    this.refreshChatsUntilDone();
    await Promise.all([...this.chats.values()].filter((c) => c.loaded).map((c) => this.catchUp(c)));
    this.emit('caught-up');
  }

  onFrame(data) {
    let ev;
    try {
      ev = JSON.parse(data);
    } catch {
      return;
    }
    switch (ev.type) {
      case 'message':
        return this.onMessage(ev);
      case 'ack':
        return this.onAck(ev);
      case 'error':
        return this.onError(ev);
      case 'typing':
        return this.onTyping(ev);
      case 'joined':
      case 'left':
        return this.onMembership(ev);
      case 'pong':
        this.cancel(this.pongTimer);
        return undefined;
      default:
        return undefined;
    }
  }

  onMessage(m) {
    const known = this.chats.has(m.chat);
    const c = this.chat(m.chat, m.to ? { kind: 'direct', members: [m.from, m.to].sort() } : { kind: 'group' });
    if (!known) this.refreshChatsUntilDone();
    const fresh = this.acceptStored(c, m);
    c.typing.delete(m.from);
    if (fresh && m.from !== this.me && !c.open) c.unread++;
    this.afterConfirmed(c);
  }

  /** After a confirmed message: move head, or fill a gap from history. */
  afterConfirmed(c) {
    if (c.loaded && c.head === null && c.bySeq.has(1)) {
      // The chat was empty when we read it: seq 1 is its first message.
      c.head = { id: c.bySeq.get(1).id, seq: 1 };
    }
    c.advanceHead();
    if (c.hasGap()) this.catchUp(c);
    this.emit('messages', { chat: c.id });
  }

  onAck(ack) {
    const o = this.outbox.get(ack.ref) || this.outbox.get(ack.id);
    if (!o) return;
    this.outbox.delete(ack.id);
    this.cancel(o.timer);
    const c = this.chat(ack.chat);
    const m = c.msgs.get(ack.id) || this.chat(o.chat).msgs.get(ack.id);
    if (o.chat !== ack.chat) this.chat(o.chat).msgs.delete(ack.id);
    c.put({ id: ack.id, chat: ack.chat, seq: ack.seq, ts: ack.ts, from: this.me, body: m ? m.body : o.body });
    this.afterConfirmed(c);
  }

  onError(ev) {
    const o = ev.ref && this.outbox.get(ev.ref);
    if (!o) {
      if (ev.code !== 'rate_limited' || !String(ev.ref || '').startsWith('typing')) {
        this.setNotice(`${ev.code}: ${ev.message}`);
      }
      return;
    }
    this.cancel(o.timer);
    if ((ev.code === 'unavailable' || ev.code === 'rate_limited') && o.tries < SEND_RETRIES) {
      this.markSend(ev.ref, 'queued');
      o.timer = this.later(backoffDelay(o.tries), () => this.transmit(ev.ref));
      return;
    }
    // Refused for good (too large, forbidden...), or retried enough: the
    // user decides (retry() sends it again, same id).
    this.outbox.delete(ev.ref);
    o.failed = true;
    this.failed = this.failed || new Map();
    this.failed.set(ev.ref, o);
    this.markSend(ev.ref, 'failed', `${ev.code}: ${ev.message}`);
  }

  onTyping(ev) {
    if (ev.from === this.me) return;
    const chatId = ev.chat || privateChatId(ev.from, ev.to || this.me);
    const c = this.chat(chatId, ev.chat ? { kind: 'group' } : { kind: 'direct', members: [ev.from, this.me].sort() });
    c.typing.set(ev.from, Date.now() + TYPING_SHOWN_MS);
    this.emit('typing', { chat: chatId });
    this.later(TYPING_SHOWN_MS + 20, () => {
      const until = c.typing.get(ev.from);
      if (until !== undefined && until <= Date.now()) {
        c.typing.delete(ev.from);
        this.emit('typing', { chat: chatId });
      }
    });
  }

  onMembership(ev) {
    if (ev.user === this.me) {
      if (ev.type === 'left') this.chats.delete(ev.chat);
      this.refreshChatsUntilDone();
    } else {
      this.emit('membership', { chat: ev.chat, user: ev.user, joined: ev.type === 'joined' });
    }
  }

  // --- sending ------------------------------------------------------------

  /** Sends `body` to a chat; shown at once, resent until acked. Returns the message id. */
  send(chatId, body) {
    const c = this.chat(chatId);
    const id = uuidv7();
    const o = { chat: chatId, body, tries: 0, timer: null };
    if (c.kind === 'direct') o.to = this.peerOf(c);
    this.outbox.set(id, o);
    c.msgs.set(id, { id, chat: chatId, from: this.me, body, ts: Date.now(), seq: null, sentAt: Date.now(), state: 'queued' });
    this.stopTyping();
    this.transmit(id);
    this.emit('messages', { chat: chatId });
    return id;
  }

  /** Sends a failed message again, with its id. */
  retry(id) {
    const o = this.failed && this.failed.get(id);
    if (!o) return;
    this.failed.delete(id);
    o.tries = 0;
    o.failed = false;
    this.outbox.set(id, o);
    this.transmit(id);
  }

  transmit(id) {
    const o = this.outbox.get(id);
    if (!o) return;
    const event = { type: 'send', id, ref: id, body: o.body };
    if (o.to) event.to = o.to;
    else event.chat = o.chat;
    if (!this.raw(event)) {
      this.markSend(id, 'queued');
      return;
    }
    o.tries++;
    this.markSend(id, 'sending');
    const ws = this.ws;
    this.cancel(o.timer);
    o.timer = this.later(ACK_TIMEOUT_MS, () => {
      if (this.outbox.has(id) && this.ws === ws) this.drop('no ack');
    });
  }

  markSend(id, state, error = null) {
    for (const c of this.chats.values()) {
      const m = c.msgs.get(id);
      if (m && m.seq == null) {
        m.state = state;
        m.error = error;
        this.emit('messages', { chat: c.id });
        return;
      }
    }
  }

  // --- typing -------------------------------------------------------------

  /** Call on every keystroke in a chat's composer. */
  typing(chatId) {
    if (this.typingTimer && this.typingTarget === chatId) return;
    this.cancel(this.typingTimer);
    this.typingTarget = chatId;
    const wait = Math.max(TYPING_DEBOUNCE_MS, this.lastTypingSent + TYPING_EVERY_MS - Date.now());
    this.typingTimer = this.later(wait, () => {
      this.typingTimer = null;
      const c = this.chats.get(chatId);
      if (!c) return;
      const event = { type: 'typing', ref: `typing-${Date.now()}` };
      if (c.kind === 'direct') event.to = this.peerOf(c);
      else event.chat = chatId;
      if (this.raw(event)) this.lastTypingSent = Date.now();
    });
  }

  stopTyping() {
    this.cancel(this.typingTimer);
    this.typingTimer = null;
  }

  /** Users typing in a chat now. */
  typers(chatId) {
    const c = this.chats.get(chatId);
    if (!c) return [];
    const now = Date.now();
    return [...c.typing].filter(([, until]) => until > now).map(([u]) => u);
  }
}
