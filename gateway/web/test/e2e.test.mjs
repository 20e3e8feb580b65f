// End-to-end tests of the browser client in headless Chromium (Debian's
// package, driven by playwright-core) against a real stack: Redis,
// PostgreSQL, the persister, two gateways and nginx in front (stack.mjs).
//
//   node --test test/e2e.test.mjs          (scripts/test runs it)
//
// CHROMIUM overrides /usr/bin/chromium. Screenshots go to test/artifacts/.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { chromium } from 'playwright-core';

import { devUserId, privateChatId } from '../public/assets/ids.js';
import { startStack, WEB_DIR } from './stack.mjs';

const ARTIFACTS = path.join(WEB_DIR, 'test', 'artifacts');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT_MS = 10000;

let stack;
let browser;
const open = []; // every user's browser context, closed after each test

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it returns a truthy value; fails with `what` and the last value. */
async function until(what, check, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      assert.fail(`${what}: not within ${timeoutMs} ms (last: ${last instanceof Error ? last.stack : JSON.stringify(last)})`);
    }
    await sleep(50);
  }
}

/** A person in their own browser context: signed in through the dev sign-in. */
async function signIn(name, url = stack.url) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  const errors = [];
  const calls = []; // the REST calls this page made, "METHOD /path status", for failure reports
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/WebSocket connection to .* failed|Failed to load resource/.test(m.text())) {
      errors.push(m.text());
    }
  });
  const sent = []; // frames this page's sockets sent and received, parsed, with the time
  const received = [];
  page.on('websocket', (ws) => {
    ws.on('framesent', (f) => sent.push({ at: Date.now(), ...JSON.parse(f.payload) }));
    ws.on('framereceived', (f) => received.push({ at: Date.now(), ...JSON.parse(f.payload) }));
  });
  page.on('response', (r) => {
    const u = new URL(r.url());
    if (u.pathname.startsWith('/v1/')) calls.push(`${r.request().method()} ${u.pathname} ${r.status()}`);
  });
  await page.goto(url);
  await page.fill('#signin-name', name);
  await page.click('#signin-form button[type=submit]');
  await page.waitForSelector('#status[data-status="online"]', { timeout: WAIT_MS });
  const id = (await page.textContent('#me-id')).trim();
  const user = { name, id, context, page, errors, sent, received, calls };
  open.push(user);
  return user;
}

/** The messages the open chat shows, in page order. */
function shown(user) {
  return user.page.$$eval('#message-list .msg', (els) =>
    els.map((e) => ({
      id: e.dataset.id,
      seq: e.dataset.seq ? Number(e.dataset.seq) : null,
      body: e.querySelector('.body').textContent,
      from: e.querySelector('.from').textContent,
      state: [...e.classList].find((c) => c.startsWith('state-')),
    })),
  );
}

/** What a failure report says of `user`'s page (and of the stack): the client's state, frames, REST calls, logs. */
async function pageReport(user) {
  const state = await user.page
    .evaluate(() => ({
      status: window.chatClient.status,
      lastClose: window.chatClient.lastClose,
      banner: document.getElementById('banner').textContent,
      chats: [...window.chatClient.chats.keys()],
    }))
    .catch((err) => String(err));
  const frames = (list) => JSON.stringify(list.filter((f) => f.type !== 'ping' && f.type !== 'pong'));
  let report = `client: ${JSON.stringify(state)}\nreceived: ${frames(user.received)}\nsent: ${frames(user.sent)}`;
  for (const u of open) report += `\n${u.name}'s REST calls: ${u.calls.join(', ')}`;
  return `${report}\n${stack.logs()}`;
}

async function waitForBodies(user, bodies, timeoutMs = WAIT_MS) {
  const what = `${user.name} sees ${bodies.join(' | ')}`;
  let seen = null;
  try {
    return await until(what, async () => {
      const msgs = await shown(user);
      seen = msgs;
      const have = new Set(msgs.filter((m) => m.state === 'state-sent').map((m) => m.body));
      return bodies.every((b) => have.has(b)) && msgs;
    }, timeoutMs);
  } catch (e) {
    e.message += `\n${user.name} shows ${JSON.stringify(seen)}\n${await pageReport(user)}`;
    throw e;
  }
}

async function send(user, body) {
  await user.page.fill('#composer-input', body);
  await user.page.press('#composer-input', 'Enter');
}

async function openChat(user, chatId) {
  const item = user.page.locator(`#chat-list li[data-chat="${chatId}"]`);
  try {
    await item.waitFor({ timeout: WAIT_MS });
  } catch (e) {
    e.message += `\n${user.name} does not list ${chatId}\n${await pageReport(user)}`;
    throw e;
  }
  await item.click();
  await user.page.waitForFunction((id) => document.getElementById('chat-id').textContent === id, chatId);
  await user.page.waitForFunction(() => window.chatClient.chats.get(document.getElementById('chat-id').textContent)?.loaded);
}

/** Every body once, seqs strictly increasing and without holes. */
function assertOnceInOrder(msgs, who) {
  const bodies = msgs.map((m) => m.body);
  assert.equal(new Set(bodies).size, bodies.length, `${who}: a message shown twice: ${JSON.stringify(bodies)}`);
  const ids = msgs.map((m) => m.id);
  assert.equal(new Set(ids).size, ids.length, `${who}: an id shown twice`);
  for (let i = 1; i < msgs.length; i++) {
    assert.equal(msgs[i].seq, msgs[i - 1].seq + 1, `${who}: seq ${msgs[i - 1].seq} then ${msgs[i].seq}: ${JSON.stringify(msgs)}`);
  }
}

async function screenshot(user, file) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await user.page.screenshot({ path: path.join(ARTIFACTS, file) });
}

async function totalConnections() {
  return (await stack.connections(0)) + (await stack.connections(1));
}

describe('browser client', { timeout: 150000 }, () => {
  before(async () => {
    stack = await startStack();
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
    });
  });

  after(async () => {
    if (browser) await browser.close();
    if (stack) await stack.stop();
  });

  /** Closes this test's browsers; fails the test on an error the pages threw. */
  async function closeAll(t) {
    const errors = open.flatMap((u) => u.errors.map((e) => `${u.name}: ${e}`));
    await Promise.all(open.splice(0).map((u) => u.context.close()));
    if (t && errors.length) assert.fail(`errors in the pages:\n${errors.join('\n')}`);
  }

  test('two users: a private message arrives, the typing indicator comes and goes', async (t) => {
    t.after(() => closeAll());
    const alice = await signIn('alice');
    const bob = await signIn('bob');
    const dm = privateChatId(alice.id, bob.id);

    // Alice starts the private chat by Bob's name (the dev rule gives his id).
    await alice.page.fill('#direct-user', 'bob');
    await alice.page.click('#new-direct button');
    assert.equal(await alice.page.textContent('#chat-id'), dm, 'the client computes the contract\'s private chat id');
    assert.equal(await alice.page.textContent('#chat-title'), 'bob');
    await send(alice, 'Hi Bob! Lunch at noon?');
    await waitForBodies(alice, ['Hi Bob! Lunch at noon?']);

    // Bob sees the chat appear with an unread badge, opens it, reads it.
    await bob.page.locator(`#chat-list li[data-chat="${dm}"] .unread`).waitFor({ timeout: WAIT_MS });
    await openChat(bob, dm);
    await waitForBodies(bob, ['Hi Bob! Lunch at noon?']);

    // Alice types for ~2 s: Bob sees her typing; at most one typing event a second.
    await alice.page.focus('#composer-input');
    const typingFrom = Date.now();
    await alice.page.keyboard.type('Let me check the place…', { delay: 90 });
    const lastKey = Date.now();
    await until('bob sees the typing indicator', async () => (await bob.page.textContent('#typing')).includes('is typing'), 3000);
    const typings = alice.sent.filter((f) => f.type === 'typing' && f.at >= typingFrom);
    assert.ok(typings.length >= 1, 'alice sent typing events');
    assert.ok(typings.length <= Math.ceil((lastKey - typingFrom) / 1000) + 1, `too many typing events: ${typings.length} in ${lastKey - typingFrom} ms`);
    for (let i = 1; i < typings.length; i++) {
      assert.ok(typings[i].at - typings[i - 1].at >= 1000, `typing events ${typings[i].at - typings[i - 1].at} ms apart`);
    }
    assert.ok(typings[0].at - typingFrom >= 280, 'the first typing event waits for the 300 ms debounce');
    assert.deepEqual(typings[0].to, bob.id);
    // ...and it goes away about 3 s after her last typing event.
    await until('the typing indicator goes away', async () => (await bob.page.textContent('#typing')) === '', 6000);
    const lastTyping = bob.received.filter((f) => f.type === 'typing').pop();
    const hiddenAfter = Date.now() - lastTyping.at;
    assert.ok(hiddenAfter >= 2900 && hiddenAfter <= 4000, `hidden ${hiddenAfter} ms after the last typing event bob received`);
    assert.equal(lastTyping.from, alice.id);

    await alice.page.fill('#composer-input', '');
    await send(bob, 'Sure, see you there');
    await send(alice, 'Great');
    const a = await waitForBodies(alice, ['Hi Bob! Lunch at noon?', 'Sure, see you there', 'Great']);
    const b = await waitForBodies(bob, ['Hi Bob! Lunch at noon?', 'Sure, see you there', 'Great']);
    assertOnceInOrder(a, 'alice');
    assert.deepEqual(a.map((m) => m.id), b.map((m) => m.id), 'both see the same messages in the same order');
    assert.deepEqual(a.map((m) => m.from), ['you', 'bob', 'you'], 'alice knows bob by the name she typed');

    // The chat view, for a person to look at.
    await bob.page.fill('#composer-input', 'Sounds good');
    await bob.page.press('#composer-input', 'Shift+Enter');
    await bob.page.keyboard.type('(typing…)');
    await until('alice sees bob typing', async () => (await alice.page.textContent('#typing')).includes('is typing'), 3000);
    await screenshot(alice, 'chat.png');
    await closeAll(t);
  });

  test('history pages back with "load older"', async (t) => {
    t.after(() => closeAll());
    const hana = await signIn('hana');
    await hana.page.fill('#direct-user', 'ivan');
    await hana.page.click('#new-direct button');
    const dm = privateChatId(hana.id, devUserId('ivan'));
    // 60 messages, under the gateways' send rate.
    await hana.page.evaluate(async (chat) => {
      for (let i = 1; i <= 60; i++) {
        window.chatClient.send(chat, `note ${i}`);
        await new Promise((r) => setTimeout(r, 30));
      }
    }, dm);
    await waitForBodies(hana, ['note 60']);
    await until('all 60 acked', async () => (await shown(hana)).filter((m) => m.state === 'state-sent').length === 60);
    // Ivan signs in afterwards and reads the chat from history.
    const ivan = await signIn('ivan');

    await openChat(ivan, dm);
    let msgs = await shown(ivan);
    assert.equal(msgs.length, 50, 'the first page is the latest 50');
    assert.equal(msgs[0].body, 'note 11');
    assert.ok(await ivan.page.isVisible('#load-older'));
    await ivan.page.click('#load-older');
    msgs = await until('older messages', async () => {
      const m = await shown(ivan);
      return m.length === 60 && m;
    });
    assertOnceInOrder(msgs, 'ivan');
    assert.deepEqual(msgs.map((m) => m.body), Array.from({ length: 60 }, (_, i) => `note ${i + 1}`));
    await ivan.page.waitForSelector('#history-start', { state: 'visible' });
    assert.ok(await ivan.page.isHidden('#load-older'));
    await closeAll(t);
  });

  test('a group of three users across both gateways', async (t) => {
    t.after(() => closeAll());
    // Each on a different way in: gateway 1, gateway 2, and the load balancer.
    const carol = await signIn('carol', stack.gatewayUrl(0));
    const dave = await signIn('dave', stack.gatewayUrl(1));
    const erin = await signIn('erin', stack.url);

    await carol.page.fill('#group-title', 'Launch plan');
    await carol.page.click('#new-group button');
    await carol.page.waitForFunction(() => document.getElementById('chat-title').textContent === 'Launch plan');
    const group = (await carol.page.textContent('#chat-id')).trim();
    // Members are added by the ids they share.
    for (const who of [dave, erin]) {
      await carol.page.fill('#member-id', who.id);
      // The id went into the field (an empty one would not submit, and the
      // wait below would pass at once).
      assert.equal(await carol.page.inputValue('#member-id'), who.id);
      await carol.page.click('#add-member button');
      await carol.page.waitForFunction(() => document.getElementById('member-id').value === '');
    }
    await openChat(dave, group);
    await openChat(erin, group);
    assert.equal(await erin.page.textContent('#chat-title'), 'Launch plan');

    await send(carol, 'Kick-off at 10');
    await waitForBodies(dave, ['Kick-off at 10']);
    await send(dave, 'I will bring the slides');
    await send(erin, 'Booked room 4');
    const everyone = ['Kick-off at 10', 'I will bring the slides', 'Booked room 4'];
    const views = await Promise.all([carol, dave, erin].map((u) => waitForBodies(u, everyone)));
    for (const [i, v] of views.entries()) {
      assertOnceInOrder(v, ['carol', 'dave', 'erin'][i]);
      assert.deepEqual(v.map((m) => m.id), views[0].map((m) => m.id), 'everyone sees one order');
    }
    await screenshot(erin, 'group.png');
    await closeAll(t);
  });

  test('keys typed into another field while a chat opens stay in that field', async (t) => {
    t.after(() => closeAll());
    const nora = await signIn('nora');
    // The history answers late, as on a slow network.
    await nora.page.route('**/v1/chats/*/messages*', async (route) => {
      await sleep(1000);
      await route.continue();
    });
    await nora.page.fill('#group-title', 'Slow history');
    await nora.page.click('#new-group button');
    await nora.page.waitForFunction(() => document.getElementById('chat-title').textContent === 'Slow history');
    // Nora goes on to add a member while the history is still on its way.
    const typed = 'someone-with-a-long-name';
    await nora.page.click('#member-id');
    await nora.page.keyboard.type(typed, { delay: 80 });
    await nora.page.waitForFunction(() => window.chatClient.chats.get(document.getElementById('chat-id').textContent)?.loaded);
    assert.equal(await nora.page.inputValue('#member-id'), typed);
    assert.equal(await nora.page.inputValue('#composer-input'), '');
    await closeAll(t);
  });

  test('the gateway a browser is on is killed: it reconnects through the load balancer and catches up', async (t) => {
    t.after(() => closeAll());
    await until('no connections left from earlier tests', async () => (await totalConnections()) === 0);
    const frank = await signIn('frank');
    const k = await until('frank on one gateway', async () => {
      const [c0, c1] = [await stack.connections(0), await stack.connections(1)];
      return c0 + c1 === 1 && (c0 === 1 ? '0' : '1');
    }).then(Number);
    // Grace is on the other gateway, which stays up.
    const grace = await signIn('grace', stack.gatewayUrl(1 - k));
    const dm = privateChatId(frank.id, grace.id);
    await frank.page.fill('#direct-user', 'grace');
    await frank.page.click('#new-direct button');
    await send(frank, 'before the crash');
    await openChat(grace, dm);
    await waitForBodies(grace, ['before the crash']);
    await waitForBodies(frank, ['before the crash']);

    await frank.page.evaluate(() => {
      window.statuses = [];
      window.chatClient.addEventListener('change', (e) => {
        if (e.detail.what === 'status') window.statuses.push([window.chatClient.status, Date.now()]);
      });
    });
    await stack.gateways[k].kill('SIGKILL');
    // Right away: Grace writes three messages, and Frank one, while his socket is gone.
    await Promise.all([
      grace.page.evaluate((chat) => ['while you were away 1', 'while you were away 2', 'while you were away 3'].forEach((b) => window.chatClient.send(chat, b)), dm),
      frank.page.evaluate((chat) => window.chatClient.send(chat, 'sent during the outage'), dm),
    ]);

    const all = ['before the crash', 'while you were away 1', 'while you were away 2', 'while you were away 3', 'sent during the outage'];
    await frank.page.waitForSelector('#status[data-status="online"]', { timeout: WAIT_MS });
    const f = await waitForBodies(frank, all);
    const g = await waitForBodies(grace, all);
    // Let any late duplicate show up before counting.
    await sleep(500);
    const fAfter = await shown(frank);
    assertOnceInOrder(fAfter, 'frank');
    assert.equal(fAfter.length, all.length, JSON.stringify(fAfter));
    assert.deepEqual(fAfter.map((m) => m.id), f.map((m) => m.id));
    assertOnceInOrder(g, 'grace');
    assert.deepEqual(fAfter.map((m) => m.id), (await shown(grace)).map((m) => m.id));
    const timeline = await frank.page.evaluate(() => window.statuses);
    const statuses = timeline.map(([st]) => st);
    assert.ok(statuses.includes('offline') && statuses.includes('reconnecting'), `frank's statuses: ${statuses}`);
    assert.equal(statuses[statuses.length - 1], 'online');
    // Grace's messages were accepted while Frank had no connection: he got
    // them from history after reconnecting, not live.
    const backOnline = timeline[timeline.length - 1][1];
    const graceAcks = grace.received.filter((fr) => fr.type === 'ack' && fr.chat === dm).slice(-3);
    assert.equal(graceAcks.length, 3);
    assert.ok(graceAcks.every((a) => a.at < backOnline), `acks at ${graceAcks.map((a) => a.at - backOnline)} ms from frank's reconnect`);
    const away = new Set(g.filter((m) => m.body.startsWith('while you were away')).map((m) => m.id));
    assert.ok(!frank.received.some((fr) => fr.type === 'message' && away.has(fr.id)), 'no live delivery of them to frank');
    assert.equal(await stack.connections(1 - k), 2, 'both on the surviving gateway');
    // The send that had no ack went again with the same id.
    const outage = frank.sent.filter((fr) => fr.type === 'send' && fr.body === 'sent during the outage');
    assert.ok(outage.length >= 1);
    assert.equal(new Set(outage.map((fr) => fr.id)).size, 1, 'resends keep the id');

    // A seq gap (live messages lost) is filled from history at once.
    await frank.page.evaluate(() => {
      const c = window.chatClient;
      const original = c.onFrame.bind(c);
      let drop = 2;
      c.onFrame = (data) => {
        if (drop > 0 && JSON.parse(data).type === 'message') {
          drop--;
          return;
        }
        original(data);
      };
    });
    const historyReads = [];
    frank.page.on('request', (r) => r.url().includes('/messages?') && historyReads.push(r.url()));
    await grace.page.evaluate((chat) => ['gap 1', 'gap 2', 'gap 3'].forEach((b) => window.chatClient.send(chat, b)), dm);
    await waitForBodies(frank, ['gap 1', 'gap 2', 'gap 3']);
    assert.ok(historyReads.some((u) => u.includes('after=')), `a history read after the gap: ${historyReads}`);
    assertOnceInOrder(await shown(frank), 'frank after the gap');
    await closeAll(t);
    // A new gateway process where the killed one was, for the next tests.
    await stack.replaceGateway(k);
  });

  test('a draining gateway (SIGTERM) closes with 1001: the browser reconnects to the other one and catches up', async (t) => {
    t.after(() => closeAll());
    await until('no connections left from earlier tests', async () => (await totalConnections()) === 0);
    const lee = await signIn('lee');
    const d = await until('lee on one gateway', async () => {
      const [c0, c1] = [await stack.connections(0), await stack.connections(1)];
      return c0 + c1 === 1 && (c0 === 1 ? '0' : '1');
    }).then(Number);
    const mia = await signIn('mia', stack.gatewayUrl(1 - d));
    const dm = privateChatId(lee.id, mia.id);
    await lee.page.fill('#direct-user', 'mia');
    await lee.page.click('#new-direct button');
    await send(lee, 'see you after the deploy');
    await openChat(mia, dm);
    await waitForBodies(mia, ['see you after the deploy']);

    const draining = stack.gateways[d];
    process.kill(draining.pid, 'SIGTERM');
    await lee.page.waitForFunction(() => window.chatClient.lastClose === 1001, null, { timeout: WAIT_MS });
    await send(mia, 'deploying now');
    await send(lee, 'ok');
    const all = ['see you after the deploy', 'deploying now', 'ok'];
    // nginx may answer 502 for a few seconds (max_fails=1, fail_timeout=5s:
    // both addresses failed within 5 s in this run): the client retries.
    const l = await waitForBodies(lee, all, 20000);
    const m = await waitForBodies(mia, all, 20000);
    await lee.page.waitForSelector('#status[data-status="online"]', { timeout: WAIT_MS });
    assertOnceInOrder(l, 'lee');
    assert.deepEqual(l.map((x) => x.id), m.map((x) => x.id));
    const exit = await draining.exited;
    assert.equal(exit.code, 0, 'the drained gateway exits cleanly');
    assert.equal(await stack.connections(1 - d), 2, 'both on the gateway that stays');
    await closeAll(t);
    await stack.replaceGateway(d);
  });

  test('offline is shown, sends wait and go out when the connection is back; a refused send shows as failed', async (t) => {
    t.after(() => closeAll());
    const judy = await signIn('judy');
    // Kim straight to a gateway; Judy through the load balancer.
    const kim = await signIn('kim', stack.gatewayUrl(0));
    const dm = privateChatId(judy.id, kim.id);
    await judy.page.fill('#direct-user', 'kim');
    await judy.page.click('#new-direct button');

    // A body over the gateways' limit (4096 bytes) is refused: "send failed", with a retry.
    await send(judy, 'x'.repeat(5000));
    await judy.page.waitForSelector('#message-list .msg.state-failed .retry', { timeout: WAIT_MS });
    assert.match(await judy.page.textContent('#message-list .msg.state-failed .state'), /send failed \(too_large/);

    // The load balancer goes away: Judy (through it) is offline.
    await stack.pauseNginx();
    await judy.page.waitForSelector('#status[data-status="offline"]', { timeout: WAIT_MS });
    await send(judy, 'are you there?');
    await judy.page.waitForSelector('#message-list .msg.state-queued', { timeout: WAIT_MS });
    await until('the banner counts the waiting message', async () => /Offline.*1 message will be sent/.test(await judy.page.textContent('#banner')));
    await screenshot(judy, 'offline.png');

    await stack.resumeNginx();
    await judy.page.waitForSelector('#status[data-status="online"]', { timeout: 20000 });
    await waitForBodies(judy, ['are you there?']);
    await openChat(kim, dm);
    const k = await waitForBodies(kim, ['are you there?']);
    assert.equal(k.length, 1, 'the refused message was never delivered');
    assert.ok(await judy.page.isHidden('#banner'));
    await closeAll(t);
  });
});
