// A throwaway chat stack for the browser tests, as the Rust harness builds
// one (gateway/tests/it/harness): redis-server on a free port, a PostgreSQL
// cluster in a fresh directory (run as the postgres user when we are root),
// `persister migrate`, then the persister, two gateways from the cargo build
// (each prints `listening on ADDR`) and nginx in front, with a config made
// from deploy/nginx.conf for these ports. Everything listens on 127.0.0.1.
//
// Teardown is by PID only: the processes this module started, and the
// cluster in its own directory (`pg_ctl stop`). Children are started through
// `setpriv --pdeathsig KILL`, so they die with this process even when it is
// killed; directories a killed run left behind are swept by the next one.
//
//   node test/stack.mjs      start one and keep it up until Ctrl-C (for poking at it)
//
// Environment: CHAT_BIN_DIR (default: $CARGO_TARGET_DIR or <repo>/target, then /debug),
// PG_BINDIR, STACK_LOG=1 (forward the processes' output).

import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const WEB_DIR = path.resolve(HERE, '..');
export const REPO = path.resolve(WEB_DIR, '../..');
const START_TIMEOUT_MS = 30000;
const TMP_PREFIX = 'chat-web-';

const isRoot = process.getuid && process.getuid() === 0;
const log = (...a) => process.env.STACK_LOG && console.error('[stack]', ...a);

export function binDir() {
  if (process.env.CHAT_BIN_DIR) return process.env.CHAT_BIN_DIR;
  return path.join(process.env.CARGO_TARGET_DIR || path.join(REPO, 'target'), 'debug');
}

function pgBinDir() {
  const candidates = [process.env.PG_BINDIR];
  const fromConfig = spawnSync('pg_config', ['--bindir'], { encoding: 'utf8' });
  if (fromConfig.status === 0) candidates.push(fromConfig.stdout.trim());
  candidates.push('/usr/lib/postgresql/15/bin');
  const dir = candidates.find((d) => d && fs.existsSync(path.join(d, 'initdb')) && fs.existsSync(path.join(d, 'pg_ctl')));
  if (!dir) throw new Error('PostgreSQL server binaries not found (apt-get install postgresql-15, or set PG_BINDIR)');
  return dir;
}

async function freePort() {
  const srv = net.createServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const { port } = srv.address();
  srv.close();
  await once(srv, 'close');
  return port;
}

function tcpOpen(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    const done = (ok) => {
      s.destroy();
      resolve(ok);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    s.setTimeout(1000, () => done(false));
  });
}

async function redisPing(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    let buf = '';
    const done = (ok) => {
      s.destroy();
      resolve(ok);
    };
    s.once('connect', () => s.write('PING\r\n'));
    s.on('data', (d) => {
      buf += d;
      if (buf.includes('\r\n')) done(buf.startsWith('+PONG'));
    });
    s.once('error', () => done(false));
    s.setTimeout(1000, () => done(false));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, check, timeoutMs = START_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`${what}: not ready within ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Runs a command to completion; throws with its output when it fails. */
function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 60000, ...opts });
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}):\n${r.stdout || ''}${r.stderr || ''}${r.error || ''}`);
  }
  return r.stdout;
}

/** A PostgreSQL binary, as the postgres user when we are root (the server refuses root). */
function asPostgres(bin, args, cwd) {
  return isRoot ? ['runuser', ['-u', 'postgres', '--', bin, ...args], { cwd }] : [bin, args, { cwd }];
}

/**
 * A child process whose output is kept (the last 64 KiB) and, when
 * `ready` is given, which is ready once a stdout line starts with it; the
 * rest of that line is its address.
 */
class Child {
  constructor(name, program, args, env, ready, deathSignal = 'KILL') {
    this.name = name;
    this.output = '';
    // setpriv: the child gets a signal when this process dies, however it dies.
    this.proc = spawn('setpriv', ['--pdeathsig', deathSignal, '--', program, ...args], {
      env: { PATH: process.env.PATH, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.pid = this.proc.pid;
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    this.exitStatus = null;
    this.exited.then((s) => {
      this.exitStatus = s;
    });
    this.address = new Promise((resolve, reject) => {
      let line = '';
      this.proc.stdout.on('data', (d) => {
        this.keep(d);
        if (!ready) return;
        line += d;
        let nl;
        while ((nl = line.indexOf('\n')) >= 0) {
          const l = line.slice(0, nl).trim();
          line = line.slice(nl + 1);
          if (l.startsWith(ready)) resolve(l.slice(ready.length).trim());
        }
      });
      this.proc.stderr.on('data', (d) => this.keep(d));
      this.exited.then((s) => reject(new Error(`${name} exited (${s.code ?? s.signal}) before it was ready:\n${this.output}`)));
    });
    this.address.catch(() => {});
  }

  keep(d) {
    if (process.env.STACK_LOG) process.stderr.write(`[${this.name}] ${d}`);
    this.output = (this.output + d).slice(-65536);
  }

  async ready() {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${this.name}: no address within ${START_TIMEOUT_MS} ms:\n${this.output}`)), START_TIMEOUT_MS);
    });
    try {
      return await Promise.race([this.address, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  get alive() {
    return this.exitStatus === null;
  }

  /** Sends `signal` to this process (by PID) and waits for it to exit. */
  async kill(signal = 'SIGKILL') {
    if (!this.alive) return;
    try {
      process.kill(this.pid, signal);
    } catch {
      /* already gone */
    }
    await this.exited;
  }
}

/** Removes what runs of this module that died left in /tmp. */
function sweep() {
  for (const entry of fs.readdirSync(os.tmpdir())) {
    const m = entry.startsWith(TMP_PREFIX) && /^chat-web-(\d+)-/.exec(entry);
    if (!m) continue;
    const pid = Number(m[1]);
    try {
      process.kill(pid, 0);
      continue; // its owner lives
    } catch {
      /* dead: sweep */
    }
    const dir = path.join(os.tmpdir(), entry);
    const data = path.join(dir, 'pg', 'data');
    if (fs.existsSync(path.join(data, 'postmaster.pid'))) {
      try {
        const [cmd, args, opts] = asPostgres(path.join(pgBinDir(), 'pg_ctl'), ['stop', '-m', 'immediate', '-D', data], path.join(dir, 'pg'));
        spawnSync(cmd, args, { ...opts, stdio: 'ignore', timeout: 30000 });
      } catch {
        /* best effort */
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** nginx.conf for this stack: deploy/nginx.conf with our ports, in the foreground. */
function nginxConfig(listenPort, gatewayAddrs) {
  let conf = fs.readFileSync(path.join(REPO, 'deploy', 'nginx.conf'), 'utf8');
  const servers = gatewayAddrs.map((a) => `        server ${a} max_fails=1 fail_timeout=5s;`).join('\n');
  conf = conf.replace(/(\n\s*server 127\.0\.0\.1:\d+ [^\n]*;)+/, `\n${servers}`);
  conf = conf.replace(/listen 127\.0\.0\.1:\d+;/, `listen 127.0.0.1:${listenPort};`);
  conf = conf.replace(/worker_processes auto;/, 'worker_processes 1;');
  conf = conf.replace(/worker_connections \d+;/, 'worker_connections 1024;');
  if (!conf.includes(`listen 127.0.0.1:${listenPort};`) || !gatewayAddrs.every((a) => conf.includes(`server ${a} `))) {
    throw new Error('deploy/nginx.conf changed shape: the test stack cannot put its ports in it');
  }
  return conf;
}

export class Stack {
  constructor() {
    this.children = [];
    this.gateways = [];
    this.dir = null;
    this.pgData = null;
    this.stopped = false;
  }

  /** http://127.0.0.1:PORT of the load balancer. */
  get url() {
    return `http://127.0.0.1:${this.nginxPort}`;
  }

  gatewayUrl(i) {
    return `http://${this.gateways[i].addr}`;
  }

  spawn(name, program, args, env, ready, deathSignal) {
    const child = new Child(name, program, args, env, ready, deathSignal);
    this.children.push(child);
    return child;
  }

  async start() {
    sweep();
    const bins = binDir();
    for (const b of ['gateway', 'persister']) {
      if (!fs.existsSync(path.join(bins, b))) throw new Error(`${path.join(bins, b)} not found: run cargo build --workspace first`);
    }
    const nginx = ['/usr/sbin/nginx', '/usr/bin/nginx'].find((p) => fs.existsSync(p));
    if (!nginx) throw new Error('nginx not found (apt-get install nginx)');

    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `${TMP_PREFIX}${process.pid}-`));
    fs.chmodSync(this.dir, 0o755);
    this.secret = `web-test-${Math.random().toString(36).slice(2)}-${Date.now()}`;

    await Promise.all([this.startRedis(), this.startPostgres()]);
    const common = {
      CHAT_JWT_SECRET: this.secret,
      REDIS_URL: this.redisUrl,
      DATABASE_URL: this.databaseUrl,
      RUST_LOG: process.env.STACK_LOG ? 'info' : 'warn',
    };
    run(path.join(bins, 'persister'), ['migrate'], { env: { PATH: process.env.PATH, ...common } });

    const persister = this.spawn('persister', path.join(bins, 'persister'), [], {
      ...common,
      PERSISTER_METRICS_LISTEN: '127.0.0.1:0',
      PERSISTER_CONSUMER: 'persister-web-test',
      PERSISTER_BLOCK_MS: '200',
    }, 'metrics on ');
    this.gatewayEnv = {
      ...common,
      GATEWAY_SHARDS: '2',
      GATEWAY_DRAIN_SECS: '2',
      CHAT_DEV_LOGIN: '1',
      GATEWAY_WEB_DIR: path.join(WEB_DIR, 'public'),
    };
    this.started = 0;
    const gateways = [this.spawnGateway('127.0.0.1:0'), this.spawnGateway('127.0.0.1:0')];
    await persister.ready();
    for (const gw of gateways) {
      gw.addr = await gw.ready();
      this.gateways.push(gw);
    }
    await this.startNginx(nginx);
    return this;
  }

  spawnGateway(listen) {
    this.started++;
    const name = `gw${this.started}`;
    return this.spawn(name, path.join(binDir(), 'gateway'), [], {
      ...this.gatewayEnv,
      GATEWAY_LISTEN: listen,
      GATEWAY_NODE_ID: name,
    }, 'listening on ');
  }

  /**
   * Starts a fresh gateway process in place of gateway i (killed or
   * stopped), on the same address, so the load balancer finds it again.
   */
  async replaceGateway(i) {
    const old = this.gateways[i];
    if (old.alive) throw new Error(`gateway ${i} (pid ${old.pid}) still runs`);
    const gw = this.spawnGateway(old.addr);
    gw.addr = await gw.ready();
    this.gateways[i] = gw;
    return gw;
  }

  async startRedis() {
    const dir = path.join(this.dir, 'redis');
    fs.mkdirSync(dir);
    this.redisPort = await freePort();
    this.redis = this.spawn('redis', 'redis-server', [
      '--port', String(this.redisPort), '--bind', '127.0.0.1', '--dir', dir,
      '--save', '', '--appendonly', 'no', '--daemonize', 'no',
    ], {});
    await waitFor('redis', async () => {
      if (!this.redis.alive) throw new Error(`redis-server exited:\n${this.redis.output}`);
      return redisPing(this.redisPort);
    });
    this.redisUrl = `redis://127.0.0.1:${this.redisPort}`;
  }

  async startPostgres() {
    const bindir = pgBinDir();
    const dir = path.join(this.dir, 'pg');
    fs.mkdirSync(dir);
    if (isRoot) run('chown', ['postgres:postgres', dir]);
    this.pgData = path.join(dir, 'data');
    this.pgDir = dir;
    const pg = (bin, args) => {
      const [cmd, a, opts] = asPostgres(path.join(bindir, bin), args, dir);
      return run(cmd, a, opts);
    };
    pg('initdb', ['-D', this.pgData, '-A', 'trust', '-U', 'postgres', '-E', 'UTF8', '--locale=C', '--no-sync']);
    this.pgPort = await freePort();
    const options = `-p ${this.pgPort} -k ${this.pgData} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off`;
    pg('pg_ctl', ['start', '-w', '-t', '60', '-D', this.pgData, '-l', path.join(dir, 'postgres.log'), '-o', options]);
    this.pgCtl = (args) => pg('pg_ctl', args);
    pg('createdb', ['-h', '127.0.0.1', '-p', String(this.pgPort), '-U', 'postgres', 'chat']);
    this.databaseUrl = `postgres://postgres@127.0.0.1:${this.pgPort}/chat`;
  }

  async startNginx(nginx) {
    const prefix = path.join(this.dir, 'nginx');
    fs.mkdirSync(path.join(prefix, 'logs'), { recursive: true });
    fs.mkdirSync(path.join(prefix, 'temp'), { recursive: true });
    fs.chmodSync(prefix, 0o755);
    fs.chmodSync(path.join(prefix, 'temp'), 0o777);
    this.nginxPort = await freePort();
    const conf = path.join(prefix, 'nginx.conf');
    fs.writeFileSync(conf, nginxConfig(this.nginxPort, this.gateways.map((g) => g.addr)));
    run(nginx, ['-t', '-q', '-c', conf, '-p', `${prefix}/`, '-e', 'logs/error.log']);
    this.nginxArgs = [nginx, ['-c', conf, '-p', `${prefix}/`, '-e', 'logs/error.log', '-g', 'daemon off;']];
    await this.resumeNginx();
  }

  /** Stops the load balancer (SIGTERM): clients through it lose their connections. */
  async pauseNginx() {
    if (this.nginx) await this.nginx.kill('SIGTERM');
    this.nginx = null;
  }

  /** Starts the load balancer again, on the same port. */
  async resumeNginx() {
    const [nginx, args] = this.nginxArgs;
    // SIGTERM, not SIGKILL, when we die: the master then stops its workers.
    const child = this.spawn('nginx', nginx, args, {}, null, 'TERM');
    this.nginx = child;
    await waitFor('nginx', async () => {
      if (!child.alive) throw new Error(`nginx exited:\n${child.output}`);
      return tcpOpen(this.nginxPort);
    });
  }

  /** `gateway_connections` of gateway i, from its /metrics. */
  async connections(i) {
    const res = await fetch(`${this.gatewayUrl(i)}/metrics`);
    const text = await res.text();
    const m = /^gateway_connections(?:\{[^}]*\})? (\S+)$/m.exec(text);
    return m ? Number(m[1]) : 0;
  }

  /** Stops everything this stack started, by PID, and removes its directory. */
  async stop() {
    if (this.stopped) return;
    this.stopped = true;
    // nginx first (SIGTERM: the master stops its workers), so nothing new reaches the gateways.
    if (this.nginx) await this.nginx.kill('SIGTERM');
    await Promise.all(this.children.map((c) => c.kill('SIGKILL')));
    if (this.pgData && fs.existsSync(path.join(this.pgData, 'postmaster.pid'))) {
      try {
        this.pgCtl(['stop', '-m', 'immediate', '-w', '-t', '30', '-D', this.pgData]);
      } catch (e) {
        console.error(String(e));
      }
    }
    if (this.dir) fs.rmSync(this.dir, { recursive: true, force: true });
  }

  /** Synchronous last resort for process exit: SIGKILL by PID, stop the cluster. */
  stopNow() {
    if (this.stopped) return;
    this.stopped = true;
    for (const c of this.children) {
      if (c.alive) {
        try {
          process.kill(c.pid, c === this.nginx ? 'SIGTERM' : 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
    if (this.pgData && fs.existsSync(path.join(this.pgData, 'postmaster.pid'))) {
      try {
        this.pgCtl(['stop', '-m', 'immediate', '-D', this.pgData]);
      } catch {
        /* best effort */
      }
    }
    if (this.dir) fs.rmSync(this.dir, { recursive: true, force: true });
  }

  /** The last output of every process, for a failing test. */
  logs() {
    return this.children.map((c) => `--- ${c.name} (pid ${c.pid}${c.alive ? '' : ', exited'}) ---\n${c.output.slice(-4000)}`).join('\n');
  }
}

/** Starts a stack; it is stopped at process exit if the caller does not stop it first. */
export async function startStack() {
  const stack = new Stack();
  process.once('exit', () => stack.stopNow());
  try {
    return await stack.start();
  } catch (e) {
    await stack.stop();
    throw e;
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const stack = await startStack();
  console.log(`chat stack up: ${stack.url} (gateways ${stack.gatewayUrl(0)}, ${stack.gatewayUrl(1)}); Ctrl-C stops it`);
  const bye = async () => {
    await stack.stop();
    process.exit(0);
  };
  process.on('SIGINT', bye);
  process.on('SIGTERM', bye);
}
