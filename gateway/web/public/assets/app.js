// The page: sign-in, the chat list, one open chat. Everything it shows comes
// from the ChatClient (chat.js); it only draws and forwards what the user does.
// User text is only ever set as textContent.

import { ChatClient } from './chat.js';
import { devUserId, isUuid } from './ids.js';

const $ = (id) => document.getElementById(id);
const SESSION_KEY = 'chat.session'; // per tab: two tabs may be two users
const NAMES_KEY = 'chat.names'; // shared: user id -> display name

let session = null;
let client = null;
let current = null; // the open chat's id
let pendingJoin = null;

// --- names ------------------------------------------------------------------

const names = new Map(Object.entries(readJson(localStorage, NAMES_KEY) || {}));

function readJson(storage, key) {
  try {
    return JSON.parse(storage.getItem(key));
  } catch {
    return null;
  }
}

function rememberName(user, name) {
  if (!user || !name || names.get(user) === name) return;
  // Other tabs may have added names meanwhile: merge, then write.
  for (const [u, n] of Object.entries(readJson(localStorage, NAMES_KEY) || {})) if (!names.has(u)) names.set(u, n);
  names.set(user, name);
  try {
    localStorage.setItem(NAMES_KEY, JSON.stringify(Object.fromEntries(names)));
  } catch {
    /* storage full or off: names stay in memory */
  }
}

window.addEventListener('storage', (e) => {
  if (e.key !== NAMES_KEY) return;
  for (const [u, n] of Object.entries(readJson(localStorage, NAMES_KEY) || {})) names.set(u, n);
  renderChatList();
  renderChat();
});

function nameOf(user) {
  if (client && user === client.me) return session.name;
  return names.get(user) || `user ${user.slice(0, 8)}`;
}

/** A user id from what was typed: a UUID, or a development display name. */
function resolveUser(text) {
  const t = text.trim();
  if (isUuid(t)) return t.toLowerCase();
  if (!t) return null;
  const id = devUserId(t);
  rememberName(id, t);
  return id;
}

function chatTitle(c) {
  if (c.kind === 'direct') {
    const peer = client.peerOf(c);
    return peer === client.me ? `${session.name} (you)` : nameOf(peer);
  }
  return c.title || `group ${c.id.slice(0, 8)}`;
}

// --- sign-in ----------------------------------------------------------------

async function devLogin(name) {
  const res = await fetch('/v1/dev/login', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ name }),
  });
  if (res.status === 404) throw new Error('Development sign-in is off on this server (start the gateways with CHAT_DEV_LOGIN=1).');
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.message || `sign-in failed (HTTP ${res.status})`);
  return body;
}

function saveSession(s) {
  session = s;
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(s));
  rememberName(s.user, s.name);
}

$('signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const name = $('signin-name').value.trim();
  $('signin-error').textContent = '';
  try {
    saveSession(await devLogin(name));
    start();
  } catch (err) {
    $('signin-error').textContent = err.message;
  }
});

$('signout').addEventListener('click', () => {
  if (client) client.stop();
  client = null;
  current = null;
  sessionStorage.removeItem(SESSION_KEY);
  showSignin();
});

function showSignin() {
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-name').focus();
}

// --- the app ----------------------------------------------------------------

function start() {
  $('signin').hidden = true;
  $('app').hidden = false;
  $('me-name').textContent = session.name;
  $('me-id').textContent = session.user;
  current = null;
  client = new ChatClient({
    base: location.origin,
    session,
    renew: async () => {
      const s = await devLogin(session.name);
      saveSession(s);
      return s.token;
    },
  });
  client.addEventListener('change', (e) => onChange(e.detail));
  renderAll();
  client.start();
  client.refreshChats().catch((err) => toast(`Could not list chats: ${err.message}`));
}

function onChange(d) {
  switch (d.what) {
    case 'status':
      return renderStatus();
    case 'chats':
      renderChatList();
      if (pendingJoin && client.chats.has(pendingJoin)) {
        const id = pendingJoin;
        pendingJoin = null;
        openChat(id);
      }
      if (current && !client.chats.has(current)) {
        current = null;
        renderChat();
      }
      return undefined;
    case 'messages':
      renderChatList();
      if (d.chat === current) renderMessages(d.older);
      return undefined;
    case 'typing':
      return renderTyping();
    case 'membership':
      if (d.chat === current) toast(`${nameOf(d.user)} ${d.joined ? 'joined' : 'left'}`);
      return undefined;
    case 'notice':
      return toast(client.notice.text);
    default:
      return undefined;
  }
}

function renderAll() {
  renderStatus();
  renderChatList();
  renderChat();
}

const STATUS_TEXT = {
  online: 'online',
  connecting: 'connecting…',
  reconnecting: 'reconnecting…',
  offline: 'offline',
};

function renderStatus() {
  if (!client) return;
  const status = client.status;
  let text = STATUS_TEXT[status];
  if (status === 'offline' && client.retryAt) {
    const secs = Math.max(0, Math.ceil((client.retryAt - Date.now()) / 1000));
    text = `offline · reconnecting in ${secs} s`;
  }
  $('status').dataset.status = status;
  $('status').textContent = text;
  $('reconnect-now').hidden = status !== 'offline';
  const banner = $('banner');
  if (status === 'online' || (status === 'connecting' && !client.connectedOnce)) {
    banner.hidden = true;
  } else {
    banner.hidden = false;
    banner.dataset.status = status;
    const queued = client.outbox.size;
    const why = client.lastClose === 1001 ? 'the server was restarting' : 'the connection to the server is lost';
    banner.textContent =
      (status === 'offline' ? `Offline: ${why}. ` : 'Reconnecting… ') +
      (queued ? `${queued} message${queued === 1 ? '' : 's'} will be sent when it is back.` : 'Messages you write are sent when it is back.');
  }
}
setInterval(renderStatus, 500);

$('reconnect-now').addEventListener('click', () => client && client.reconnectNow());
window.addEventListener('online', () => client && client.reconnectNow());

function lastActivity(c) {
  let ts = 0;
  for (const m of c.msgs.values()) if (m.ts > ts) ts = m.ts;
  return ts;
}

function renderChatList() {
  if (!client) return;
  const list = $('chat-list');
  const chats = [...client.chats.values()].sort(
    (a, b) => lastActivity(b) - lastActivity(a) || chatTitle(a).localeCompare(chatTitle(b)),
  );
  list.replaceChildren(
    ...chats.map((c) => {
      const li = document.createElement('li');
      li.dataset.chat = c.id;
      li.className = c.id === current ? 'active' : '';
      const title = document.createElement('span');
      title.className = 'title';
      title.textContent = chatTitle(c);
      const kind = document.createElement('span');
      kind.className = 'kind';
      kind.textContent = c.kind === 'direct' ? 'direct' : c.visibility;
      li.append(title, kind);
      if (c.unread) {
        const badge = document.createElement('span');
        badge.className = 'unread';
        badge.textContent = String(c.unread);
        li.append(badge);
      }
      li.tabIndex = 0;
      li.setAttribute('role', 'button');
      li.addEventListener('click', () => openChat(c.id));
      li.addEventListener('keydown', (e) => {
        if (e.key === 'Enter' || e.key === ' ') {
          e.preventDefault();
          openChat(c.id);
        }
      });
      return li;
    }),
  );
  $('no-chats').hidden = chats.length > 0;
}

async function openChat(id) {
  if (current && client.chats.has(current)) client.chats.get(current).open = false;
  if (current !== id) client.stopTyping();
  current = id;
  const c = client.chats.get(id);
  c.open = true;
  c.unread = 0;
  $('composer-input').value = '';
  renderChatList();
  renderChat();
  // Now, not after the history arrives: by then the user may be typing in
  // another field, and moving focus would send their keys to the composer.
  $('composer-input').focus();
  try {
    await client.load(id);
  } catch (err) {
    toast(`Could not read the history: ${err.message}`);
  }
  if (current === id) renderMessages();
}

function renderChat() {
  const c = client && current && client.chats.get(current);
  $('empty').hidden = Boolean(c);
  $('chat-pane').hidden = !c;
  if (!c) return;
  $('chat-title').textContent = chatTitle(c);
  $('chat-kind').textContent = c.kind === 'direct' ? 'private chat' : `${c.visibility} group`;
  $('chat-id').textContent = c.id;
  $('add-member').hidden = c.kind === 'direct';
  renderMessages();
  renderTyping();
}

const STATE_TEXT = {
  queued: 'not sent yet: waiting for the connection',
  sending: 'sending…',
  sent: '✓',
  failed: 'send failed',
};

function time(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function renderMessages(older = false) {
  const c = client && current && client.chats.get(current);
  if (!c) return;
  const box = $('messages');
  const fromBottom = box.scrollHeight - box.scrollTop - box.clientHeight;
  const items = c.ordered().map((m) => {
    const mine = m.from === client.me;
    const li = document.createElement('li');
    li.className = `msg ${mine ? 'mine' : 'theirs'} state-${m.seq == null ? m.state : 'sent'}`;
    li.dataset.id = m.id;
    if (m.seq != null) li.dataset.seq = String(m.seq);
    const meta = document.createElement('div');
    meta.className = 'meta';
    const from = document.createElement('span');
    from.className = 'from';
    from.textContent = mine ? 'you' : nameOf(m.from);
    const when = document.createElement('span');
    when.textContent = time(m.ts);
    meta.append(from, when);
    if (mine) {
      const state = document.createElement('span');
      state.className = 'state';
      const st = m.seq == null ? m.state : 'sent';
      state.textContent = st === 'failed' && m.error ? `send failed (${m.error})` : STATE_TEXT[st];
      meta.append(state);
      if (st === 'failed') {
        const retry = document.createElement('button');
        retry.className = 'link retry';
        retry.type = 'button';
        retry.textContent = 'retry';
        retry.addEventListener('click', () => client.retry(m.id));
        meta.append(retry);
      }
    }
    const body = document.createElement('div');
    body.className = 'body';
    body.textContent = m.body;
    li.append(meta, body);
    return li;
  });
  $('message-list').replaceChildren(...items);
  $('load-older').hidden = !c.loaded || c.oldestReached;
  $('history-start').hidden = !(c.loaded && c.oldestReached && items.length > 0);
  // Stay at the bottom when we were there; keep the view still when older
  // messages come in above it.
  if (older || fromBottom > 40) box.scrollTop = box.scrollHeight - box.clientHeight - fromBottom;
  else box.scrollTop = box.scrollHeight;
}

function renderTyping() {
  if (!client || !current) return;
  const who = client.typers(current).map(nameOf);
  $('typing').textContent =
    who.length === 0 ? '' : who.length === 1 ? `${who[0]} is typing…` : `${who.join(', ')} are typing…`;
}

// --- what the user does -------------------------------------------------------

$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = $('composer-input');
  const body = input.value;
  if (!current || !body.trim()) return;
  client.send(current, body);
  input.value = '';
  input.focus();
});

$('composer-input').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});

$('composer-input').addEventListener('input', (e) => {
  if (!current) return;
  if (e.target.value.trim()) client.typing(current);
  else client.stopTyping();
});

$('load-older').addEventListener('click', async () => {
  if (!current) return;
  $('load-older').disabled = true;
  try {
    await client.loadOlder(current);
  } catch (err) {
    toast(`Could not load older messages: ${err.message}`);
  } finally {
    $('load-older').disabled = false;
  }
});

$('new-group').addEventListener('submit', async (e) => {
  e.preventDefault();
  try {
    const c = await client.createGroup($('group-title').value.trim(), $('group-visibility').value);
    $('group-title').value = '';
    openChat(c.id);
  } catch (err) {
    toast(`Could not create the group: ${err.message}`);
  }
});

$('new-direct').addEventListener('submit', (e) => {
  e.preventDefault();
  const user = resolveUser($('direct-user').value);
  if (!user) return;
  $('direct-user').value = '';
  openChat(client.openDirect(user).id);
});

$('join-group').addEventListener('submit', (e) => {
  e.preventDefault();
  const id = $('join-id').value.trim().toLowerCase();
  if (!isUuid(id)) return toast('A group id is a UUID');
  $('join-id').value = '';
  if (client.chats.has(id)) return openChat(id);
  pendingJoin = id;
  if (!client.raw({ type: 'join', chat: id, ref: `join-${id}` })) toast('Offline: try again when connected');
  return undefined;
});

$('add-member').addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = $('member-id').value;
  const user = resolveUser(text);
  if (!user || !current) return;
  try {
    await client.addMember(current, user);
    $('member-id').value = '';
    toast(`Added ${nameOf(user)}`);
  } catch (err) {
    toast(`Could not add ${text.trim()}: ${err.message}`);
  }
});

$('copy-id').addEventListener('click', async () => {
  try {
    await navigator.clipboard.writeText(session.user);
    toast('Your id is on the clipboard');
  } catch {
    const range = document.createRange();
    range.selectNodeContents($('me-id'));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
  }
});

let toastTimer = null;
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    t.hidden = true;
  }, 4000);
}

// For tests and the curious: the client of this page.
Object.defineProperty(window, 'chatClient', { get: () => client });

// --- go -----------------------------------------------------------------------

const saved = readJson(sessionStorage, SESSION_KEY);
if (saved && saved.token && saved.exp * 1000 > Date.now() + 60000) {
  session = saved;
  rememberName(saved.user, saved.name);
  start();
} else {
  showSignin();
}
