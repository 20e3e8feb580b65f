// Unit tests of the client's logic in Node, without a browser or a server:
// ids, backoff, the per-chat store, and the ChatClient against a fake
// WebSocket and a fake REST API.
//
//   node --test test/unit.test.mjs

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';

import { backoffDelay, ChatClient, ChatState } from '../public/assets/chat.js';
import { devUserId, isUuid, privateChatId, sha1, uuidv5, uuidv7, NAMESPACE_URL } from '../public/assets/ids.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const hex = (bytes) => Buffer.from(bytes).toString('hex');

describe('ids', () => {
  test('sha1 matches node:crypto across padding boundaries', () => {
    for (let n = 0; n < 200; n++) {
      const data = new Uint8Array(n).map((_, i) => (i * 31 + n) & 255);
      assert.equal(hex(sha1(data)), createHash('sha1').update(data).digest('hex'), `length ${n}`);
    }
    assert.equal(hex(sha1(new TextEncoder().encode('abc'))), 'a9993e364706816aba3e25717850c26c9cd0d89d');
  });

  test('uuidv5 agrees with Python uuid.uuid5 and the contract', () => {
    // python3 -c "import uuid; print(uuid.uuid5(uuid.NAMESPACE_URL, NAME))"
    assert.equal(NAMESPACE_URL, '6ba7b811-9dad-11d1-80b4-00c04fd430c8');
    assert.equal(devUserId('alice'), 'e8a3865e-0b58-585d-9c46-50a88c0ea857');
    assert.equal(devUserId('  Alice '), devUserId('alice'));
    assert.equal(uuidv5(NAMESPACE_URL, 'chat-dev-user:zoë 🙂'), '3332f1ac-fc5d-5fae-bcc0-eec10b79bb8c');
    const a = '00000000-0000-0000-0000-000000000001';
    const b = 'ffffffff-0000-0000-0000-000000000002';
    assert.equal(privateChatId(a, b), '80352142-6fe8-547f-9ec8-d8b27cfc99d0');
    assert.equal(privateChatId(b, a), privateChatId(a, b));
  });

  test('uuidv7 ids are UUIDs of version 7 that sort by time', () => {
    const early = uuidv7(1_700_000_000_000);
    const late = uuidv7(1_700_000_000_001);
    assert.ok(isUuid(early) && isUuid(late));
    assert.equal(early[14], '7');
    assert.ok(early < late);
    assert.ok(!isUuid('not-a-uuid'));
  });
});

describe('backoff', () => {
  test('doubles from 250–500 ms, with jitter, up to 7.5–15 s', () => {
    assert.equal(backoffDelay(0, () => 0), 250);
    assert.equal(backoffDelay(0, () => 1), 500);
    assert.equal(backoffDelay(1, () => 0), 500);
    assert.equal(backoffDelay(3, () => 1), 4000);
    assert.equal(backoffDelay(10, () => 0), 7500);
    assert.equal(backoffDelay(50, () => 1), 15000);
  });
});

const msg = (seq, extra = {}) => ({ id: `00000000-0000-7000-8000-${String(seq).padStart(12, '0')}`, chat: 'c', seq, from: 'u', body: `m${seq}`, ts: seq, ...extra });

describe('ChatState', () => {
  test('keeps each id once, in seq order, with pending sends last', () => {
    const c = new ChatState('c');
    assert.ok(c.put(msg(2)));
    assert.ok(c.put(msg(1)));
    assert.ok(!c.put(msg(2)), 'a second copy is not new');
    c.msgs.set('p', { id: 'p', seq: null, sentAt: 1, body: 'pending' });
    assert.deepEqual(c.ordered().map((m) => m.body), ['m1', 'm2', 'pending']);
  });

  test('head moves over consecutive seqs; a jump is a gap', () => {
    const c = new ChatState('c');
    c.loaded = true;
    c.put(msg(1));
    c.head = { id: msg(1).id, seq: 1 };
    c.put(msg(2));
    c.advanceHead();
    assert.equal(c.head.seq, 2);
    assert.ok(!c.hasGap());
    c.put(msg(5));
    c.advanceHead();
    assert.equal(c.head.seq, 2);
    assert.ok(c.hasGap());
  });
});

/** A WebSocket the test drives. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code = 1000) {
    this.readyState = 3;
    if (this.onclose) this.onclose({ code });
  }
  // test side
  open() {
    this.readyState = 1;
    this.onopen();
  }
  push(event) {
    this.onmessage({ data: JSON.stringify(event) });
  }
  drop(code) {
    this.readyState = 3;
    this.onclose({ code });
  }
}

/**
 * A REST API over an in-memory chat history (in seq order). Like the
 * server, a page after a cursor stops before a seq in `pending` (a message
 * still on its way to storage); other holes are passed.
 */
function fakeApi(history, pending = new Set()) {
  const calls = [];
  const fetchImpl = async (url) => {
    const u = new URL(url);
    calls.push(u.pathname + u.search);
    const json = (status, body) => ({ ok: status < 300, status, json: async () => body });
    if (u.pathname === '/v1/chats') return json(200, [{ id: 'c', kind: 'group', title: 'g', visibility: 'private' }]);
    const limit = Number(u.searchParams.get('limit') || 50);
    const after = u.searchParams.get('after');
    const before = u.searchParams.get('before');
    let list = history;
    const cursor = (id) => history.find((h) => h.id === id);
    if ((after && !cursor(after)) || (before && !cursor(before))) {
      return json(400, { code: 'bad_request', message: 'names no message of this chat' });
    }
    if (after) {
      const from = cursor(after).seq;
      list = list.filter((m) => m.seq > from);
      const stop = list.findIndex((m) => [...pending].some((p) => p > from && p < m.seq));
      if (stop >= 0) list = list.slice(0, stop);
      list = list.slice(0, limit);
    }
    else if (before) list = list.filter((m) => m.seq < history.find((h) => h.id === before).seq).slice(-limit);
    else list = list.slice(-limit);
    return json(200, { messages: list });
  };
  return { fetchImpl, calls };
}

async function until(what, check, ms = 3000) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(what);
    await sleep(10);
  }
}

function newClient(history, lag, pending) {
  FakeSocket.all = [];
  const api = fakeApi(history, pending);
  const client = new ChatClient({
    base: 'http://chat.test',
    session: { token: 't', user: 'me' },
    WebSocket: FakeSocket,
    fetch: api.fetchImpl,
    lag,
  });
  return { client, calls: api.calls };
}

describe('ChatClient', () => {
  test('a seq gap is filled from history at once, without duplicates', async () => {
    const history = [1, 2, 3].map((s) => msg(s));
    const { client, calls } = newClient(history);
    client.start();
    FakeSocket.all[0].open();
    await client.load('c');
    assert.equal(client.chats.get('c').head.seq, 3);
    history.push(msg(4), msg(5), msg(6));
    FakeSocket.all[0].push({ type: 'message', ...msg(6) });
    await until('gap filled', () => client.chats.get('c').head.seq === 6);
    assert.ok(calls.some((c) => c.includes(`after=${msg(3).id}`)), calls.join('\n'));
    FakeSocket.all[0].push({ type: 'message', ...msg(5) }); // late duplicate
    assert.deepEqual(client.chats.get('c').ordered().map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
    client.stop();
  });

  test('a message history does not have yet is asked for again until it is there, never skipped', async () => {
    const history = [1, 2, 3].map((s) => msg(s));
    const { client, calls } = newClient(history, { firstMs: 1, tries: 3, recheckMs: 20, maxRecheckMs: 40 });
    client.start();
    FakeSocket.all[0].open();
    await client.load('c');
    // 5 arrives live; 4 is still on its way to storage, so history (which
    // never passes it) ends at 3.
    FakeSocket.all[0].push({ type: 'message', ...msg(5) });
    const asked = () => calls.filter((c) => c.includes(`after=${msg(3).id}`)).length;
    // More often than the quick tries (the old client stopped after 6 and
    // took what it had been told live as all there was).
    await until('asked again and again', () => asked() >= 8, 12000);
    assert.equal(client.chats.get('c').head.seq, 3, 'the head stays before the missing message');
    // Stored now: the next recheck fills the hole.
    history.push(msg(4), msg(5));
    await until('hole filled', () => client.chats.get('c').head.seq === 5);
    assert.deepEqual(client.chats.get('c').ordered().map((m) => m.seq), [1, 2, 3, 4, 5]);
    client.stop();
  });

  test('a hole in the first page read is asked for, not skipped', async () => {
    // 3 is still on its way to storage; the latest page is served as stored.
    const history = [1, 2, 4, 5].map((s) => msg(s));
    const pending = new Set([3]);
    const { client } = newClient(history, { firstMs: 1, tries: 2, recheckMs: 20, maxRecheckMs: 40 }, pending);
    client.start();
    FakeSocket.all[0].open();
    await client.load('c');
    assert.equal(client.chats.get('c').head.seq, 2, 'the head stops before the hole');
    history.splice(2, 0, msg(3));
    pending.delete(3);
    await until('hole filled', () => client.chats.get('c').head.seq === 5);
    assert.deepEqual(client.chats.get('c').ordered().map((m) => m.seq), [1, 2, 3, 4, 5]);
    client.stop();
  });

  test('a chat read empty catches up from its first message without skipping a hole', async () => {
    const history = [];
    const pending = new Set();
    const { client } = newClient(history, { firstMs: 1, tries: 2, recheckMs: 20, maxRecheckMs: 40 }, pending);
    client.start();
    FakeSocket.all[0].open();
    await client.load('c');
    assert.equal(client.chats.get('c').head, null);
    // Meanwhile 1..4 were written, 2 is still on its way, and 4 arrives live.
    history.push(msg(1), msg(3), msg(4));
    pending.add(2);
    FakeSocket.all[0].push({ type: 'message', ...msg(4) });
    await until('caught up to the hole', () => client.chats.get('c').head?.seq === 1);
    await sleep(100);
    assert.equal(client.chats.get('c').head.seq, 1, 'the head stays before the hole');
    history.splice(1, 0, msg(2));
    pending.delete(2);
    await until('hole filled', () => client.chats.get('c').head.seq === 4);
    assert.deepEqual(client.chats.get('c').ordered().map((m) => m.seq), [1, 2, 3, 4]);
    client.stop();
  });

  test('after the server lost messages we hold (a 400 for our cursor), catching up ends', async () => {
    const history = [1, 2, 3, 4, 5].map((s) => msg(s));
    const { client, calls } = newClient(history, { firstMs: 1, tries: 2, recheckMs: 20, maxRecheckMs: 40 });
    client.start();
    FakeSocket.all[0].open();
    await client.load('c');
    assert.equal(client.chats.get('c').head.seq, 5);
    // Redis restarted and lost 4 and 5; the next message has seq 10.
    history.splice(3, 2, msg(10), msg(11));
    FakeSocket.all[0].push({ type: 'message', ...msg(10) });
    await until('caught up past the jump', () => client.chats.get('c').head.seq === 11);
    await sleep(100);
    const unknown = calls.filter((c) => c.includes(`after=${msg(5).id}`)).length;
    assert.equal(unknown, 1, `asked after the lost message ${unknown} times`);
    client.stop();
  });

  test('messages the server lost are dropped, one 400 each, and the catch-up goes on from what it has', async () => {
    const history = [1, 2, 3, 4, 5].map((s) => msg(s));
    const pending = new Set();
    const { client, calls } = newClient(history, { firstMs: 1, tries: 2, recheckMs: 20, maxRecheckMs: 40 }, pending);
    client.start();
    FakeSocket.all[0].open();
    await client.load('c');
    // Redis restarted and lost 4 and 5; 10, the next message, is not stored yet.
    history.splice(3, 2);
    pending.add(10);
    FakeSocket.all[0].push({ type: 'message', ...msg(10) });
    await until('back before the lost ones', () => client.chats.get('c').head?.seq === 3);
    await sleep(100);
    const lost = calls.filter((c) => c.includes(`after=${msg(4).id}`) || c.includes(`after=${msg(5).id}`));
    assert.ok(lost.length <= 2, `asked after lost messages ${lost.length} times`);
    assert.deepEqual(client.chats.get('c').ordered().map((m) => m.seq), [1, 2, 3, 10]);
    history.push(msg(10));
    pending.delete(10);
    await until('caught up', () => client.chats.get('c').head.seq === 10);
    client.stop();
  });

  test('after a 1001 close it reconnects with backoff, resends unacked sends with their id, and catches up', async () => {
    const history = [1, 2].map((s) => msg(s));
    const { client, calls } = newClient(history);
    client.start();
    const first = FakeSocket.all[0];
    first.open();
    await client.load('c');
    const id = client.send('c', 'hello');
    assert.equal(first.sent.at(-1).id, id);
    assert.equal(first.sent.at(-1).chat, 'c');

    const closedAt = Date.now();
    first.drop(1001); // a draining node
    assert.equal(client.status, 'offline');
    assert.ok(client.retryAt - closedAt >= 250 && client.retryAt - closedAt <= 500);
    assert.equal(client.chats.get('c').msgs.get(id).state, 'queued');
    // Meanwhile: our send was accepted before the close (seq 3), and someone wrote seq 4.
    history.push({ ...msg(3), id, from: 'me', body: 'hello' }, msg(4));

    await until('a second socket', () => FakeSocket.all.length === 2);
    assert.ok(Date.now() - closedAt >= 240);
    const second = FakeSocket.all[1];
    second.open();
    assert.equal(second.sent[0].type, 'send');
    assert.equal(second.sent[0].id, id, 'resent with the same id');
    await until('caught up', () => client.chats.get('c').head.seq === 4);
    assert.ok(calls.some((c) => c.includes(`after=${msg(2).id}`)));
    // The ack of the resend comes after catch-up already had it: no change.
    second.push({ type: 'ack', ref: id, id, chat: 'c', seq: 3, ts: 3 });
    const c = client.chats.get('c');
    assert.deepEqual(c.ordered().map((m) => [m.seq, m.body]), [[1, 'm1'], [2, 'm2'], [3, 'hello'], [4, 'm4']]);
    assert.equal(client.outbox.size, 0);
    client.stop();
  });

  test('a catch-up that fails (502 from the load balancer) is tried again while connected', async () => {
    const history = [1].map((s) => msg(s));
    const { client, calls } = newClient(history);
    const fetchOk = client.fetchImpl;
    let failures = 2;
    client.fetchImpl = async (url) => {
      if (url.includes('after=') && failures-- > 0) return { ok: false, status: 502, json: async () => ({}) };
      return fetchOk(url);
    };
    client.start();
    FakeSocket.all[0].open();
    await client.load('c');
    history.push(msg(2), msg(3));
    FakeSocket.all[0].push({ type: 'message', ...msg(3) });
    await until('filled after two 502s', () => client.chats.get('c').head.seq === 3);
    assert.equal(calls.filter((c) => c.includes('after=')).length, 1, 'the third try is the one that reached the API');
    assert.deepEqual(client.chats.get('c').ordered().map((m) => m.seq), [1, 2, 3]);
    client.stop();
  });

  test('unavailable is retried with the same id; too_large fails for good', async () => {
    const { client } = newClient([]);
    client.start();
    const ws = FakeSocket.all[0];
    ws.open();
    const c = client.chat('c');
    const retried = client.send('c', 'x');
    ws.push({ type: 'error', ref: retried, code: 'unavailable', message: 'redis' });
    assert.equal(c.msgs.get(retried).state, 'queued');
    await until('retried', () => ws.sent.filter((e) => e.id === retried).length === 2, 1000);
    ws.push({ type: 'ack', ref: retried, id: retried, chat: 'c', seq: 1, ts: 1 });
    assert.equal(c.msgs.get(retried).state, 'sent');

    const big = client.send('c', 'y'.repeat(5000));
    ws.push({ type: 'error', ref: big, code: 'too_large', message: 'body over 4096 bytes' });
    assert.equal(c.msgs.get(big).state, 'failed');
    assert.match(c.msgs.get(big).error, /too_large/);
    client.stop();
  });

  test('typing is sent 300 ms after the first key, then at most once a second', async () => {
    const { client } = newClient([]);
    client.start();
    const ws = FakeSocket.all[0];
    ws.open();
    client.chat('c');
    const start = Date.now();
    const times = [];
    const send = ws.send.bind(ws);
    ws.send = (data) => {
      if (JSON.parse(data).type === 'typing') times.push(Date.now() - start);
      send(data);
    };
    while (Date.now() - start < 2200) {
      client.typing('c');
      await sleep(40);
    }
    assert.ok(times.length >= 2 && times.length <= 3, `typing at ${times}`);
    assert.ok(times[0] >= 290, `first typing at ${times[0]} ms`);
    for (let i = 1; i < times.length; i++) assert.ok(times[i] - times[i - 1] >= 1000, `typing at ${times}`);
    assert.deepEqual(ws.sent.find((e) => e.type === 'typing').chat, 'c');
    client.stop();
  });

  test('a chat list read answered after a group was created is read again, not applied', async () => {
    const { client } = newClient([]);
    let answerFirst;
    const reads = [];
    const listed = (ids) => ({ ok: true, status: 200, json: async () => ids.map((id) => ({ id, kind: 'group', title: id, visibility: 'private' })) });
    client.fetchImpl = async (url, init) => {
      if (init?.method === 'POST') {
        return { ok: true, status: 201, json: async () => ({ id: 'new', title: 'n', visibility: 'private' }) };
      }
      reads.push(url);
      // The first read is answered late, with the list from before the group
      // (and before 'joined', a group someone added us to meanwhile).
      if (reads.length === 1) {
        await new Promise((resolve) => (answerFirst = resolve));
        return listed(['c']);
      }
      return listed(['c', 'joined', 'new']);
    };
    const read = client.refreshChats();
    await client.createGroup('n', 'private');
    answerFirst();
    await read;
    assert.equal(reads.length, 2, 'read again');
    assert.deepEqual([...client.chats.keys()].sort(), ['c', 'joined', 'new']);
  });

  test('a chat list read that fails after a joined event is tried again', async () => {
    const { client } = newClient([]);
    client.start();
    FakeSocket.all[0].open();
    await until('first list', () => client.chats.has('c'));
    client.chats.clear();
    const fetchOk = client.fetchImpl;
    let failures = 1;
    client.fetchImpl = async (url) => (failures-- > 0 ? { ok: false, status: 502, json: async () => ({}) } : fetchOk(url));
    FakeSocket.all[0].push({ type: 'joined', chat: 'c', user: 'me' });
    await until('listed after a 502', () => client.chats.has('c'));
    client.stop();
  });
});
