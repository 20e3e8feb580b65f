// Ids as the contract and the gateway make them: UUIDv5 (for private chats
// and development users), and UUIDv7 for the ids of messages we send.
//
// SHA-1 is implemented here (it is small) rather than taken from
// crypto.subtle: that one exists only in secure contexts, and a page opened
// as http://<a LAN address>:8080 is not one.

/** The URL namespace of RFC 4122, which the contract names for private chats. */
export const NAMESPACE_URL = '6ba7b811-9dad-11d1-80b4-00c04fd430c8';

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** True for a UUID in canonical text form (either case). */
export function isUuid(text) {
  return typeof text === 'string' && UUID_RE.test(text.toLowerCase());
}

/** SHA-1 of bytes (Uint8Array), as 20 bytes. */
export function sha1(bytes) {
  const length = bytes.length;
  const padded = (((length + 9 + 63) >> 6) << 6);
  const buf = new Uint8Array(padded);
  buf.set(bytes);
  buf[length] = 0x80;
  const view = new DataView(buf.buffer);
  view.setUint32(padded - 8, Math.floor(length / 0x20000000));
  view.setUint32(padded - 4, (length * 8) >>> 0);
  let h0 = 0x67452301, h1 = 0xefcdab89, h2 = 0x98badcfe, h3 = 0x10325476, h4 = 0xc3d2e1f0;
  const w = new Uint32Array(80);
  for (let off = 0; off < padded; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + i * 4);
    for (let i = 16; i < 80; i++) {
      const x = w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16];
      w[i] = (x << 1) | (x >>> 31);
    }
    let a = h0, b = h1, c = h2, d = h3, e = h4;
    for (let i = 0; i < 80; i++) {
      let f, k;
      if (i < 20) { f = (b & c) | (~b & d); k = 0x5a827999; }
      else if (i < 40) { f = b ^ c ^ d; k = 0x6ed9eba1; }
      else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8f1bbcdc; }
      else { f = b ^ c ^ d; k = 0xca62c1d6; }
      const t = (((a << 5) | (a >>> 27)) + f + e + k + w[i]) >>> 0;
      e = d; d = c; c = ((b << 30) | (b >>> 2)) >>> 0; b = a; a = t;
    }
    h0 = (h0 + a) >>> 0; h1 = (h1 + b) >>> 0; h2 = (h2 + c) >>> 0;
    h3 = (h3 + d) >>> 0; h4 = (h4 + e) >>> 0;
  }
  const out = new Uint8Array(20);
  const ov = new DataView(out.buffer);
  [h0, h1, h2, h3, h4].forEach((h, i) => ov.setUint32(i * 4, h));
  return out;
}

function uuidBytes(text) {
  const hex = text.replace(/-/g, '');
  const out = new Uint8Array(16);
  for (let i = 0; i < 16; i++) out[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return out;
}

function uuidText(bytes) {
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** UUID version 5 of `name` (a string, as UTF-8) in `namespace`. */
export function uuidv5(namespace, name) {
  const ns = uuidBytes(namespace);
  const text = new TextEncoder().encode(name);
  const input = new Uint8Array(16 + text.length);
  input.set(ns);
  input.set(text, 16);
  const bytes = sha1(input).slice(0, 16);
  bytes[6] = (bytes[6] & 0x0f) | 0x50;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  return uuidText(bytes);
}

/** UUID version 7: a millisecond timestamp, then random bits. */
export function uuidv7(now = Date.now()) {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  let ms = now;
  for (let i = 5; i >= 0; i--) {
    bytes[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  return uuidText(bytes);
}

/** The private chat of users a and b (the contract's rule). */
export function privateChatId(a, b) {
  const [lo, hi] = a <= b ? [a, b] : [b, a];
  return uuidv5(NAMESPACE_URL, `dm:${lo}:${hi}`);
}

/** The user id the gateway's development sign-in gives a display name. */
export function devUserId(name) {
  return uuidv5(NAMESPACE_URL, `chat-dev-user:${name.trim().toLowerCase()}`);
}
