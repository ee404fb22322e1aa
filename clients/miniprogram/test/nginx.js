// Real nginx (Debian package) in front of voxpoll, one server block per hostile host the seeds
// met (shared/longpoll-and-hosting.md §0, §1.3): 404 on upgrade, read timeouts of 15/30/60 s,
// response buffering, a 100 KB body cap, HTTP/1.0 to the upstream. A `direct` block is the
// well-configured baseline.
'use strict'

const { spawn, execFileSync } = require('node:child_process')
const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')

const GOOD = `
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_buffering off;
      proxy_read_timeout 120s;`

/** name → the body of its `location /` (the upstream is added). */
const CONFIGS = {
  direct: GOOD,
  upgrade404: `
      if ($http_upgrade) { return 404; }` + GOOD,
  timeout15: GOOD.replace('120s', '15s'),
  timeout30: GOOD.replace('120s', '30s'),
  timeout60: GOOD.replace('120s', '60s'),
  // Buffering as it bites in practice: nginx gzips streamed responses, which holds them back.
  buffering: GOOD.replace('proxy_buffering off;', 'proxy_buffering on; gzip on; gzip_min_length 0; gzip_types text/event-stream application/json;'),
  bodycap: GOOD + `
      client_max_body_size 100k;`,
  http10: `
      proxy_http_version 1.0;
      proxy_buffering off;
      proxy_read_timeout 120s;`
}

function freePort () {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)) })
    s.on('error', reject)
  })
}

function nginxBinary () {
  for (const p of ['/usr/sbin/nginx', '/usr/bin/nginx']) if (fs.existsSync(p)) return p
  try { return execFileSync('sh', ['-c', 'command -v nginx']).toString().trim() } catch (e) {}
  throw new Error('nginx not found: scripts/setup installs the Debian package')
}

/**
 * Starts nginx with every config of `configs` in front of `upstream`: one port, or several
 * (an upstream group, round-robin per request: no affinity, as cloud hosts route); resolves
 * `{urls: {name: url}, stop, accessLog}`; with `opts.accessLog`, `accessLog()` returns the lines
 * `<upstream addr> <method> <uri>` of every request served so far.
 */
async function startNginx (upstream, configs = CONFIGS, opts = {}) {
  const ports = [].concat(upstream)
  const bin = nginxBinary()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'voxpoll-nginx-'))
  for (const d of ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']) fs.mkdirSync(path.join(dir, d), { mode: 0o777 })
  fs.chmodSync(dir, 0o777)
  const urls = {}
  let servers = ''
  for (const [name, body] of Object.entries(configs)) {
    const port = await freePort()
    urls[name] = `http://127.0.0.1:${port}`
    servers += `
  server {
    listen 127.0.0.1:${port};
    location / {${body}
      proxy_pass http://voxpoll;
    }
  }`
  }
  const conf = `
worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 512; }
http {
  ${opts.accessLog ? `log_format up '$upstream_addr $request_method $uri';
  access_log ${dir}/access.log up;` : 'access_log off;'}
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  upstream voxpoll {${ports.map((p) => `
    server 127.0.0.1:${p} max_fails=0;`).join('')}
  }
${servers}
}
`
  const file = path.join(dir, 'nginx.conf')
  fs.writeFileSync(file, conf)
  const proc = spawn(bin, ['-p', dir, '-c', file], { stdio: ['ignore', 'ignore', 'pipe'] })
  let log = ''
  proc.stderr.on('data', (d) => { log += d })
  // Ready when every port accepts connections.
  const deadline = Date.now() + 10000
  for (const url of Object.values(urls)) {
    const port = Number(url.split(':')[2])
    for (;;) {
      const ok = await new Promise((resolve) => {
        const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true) })
        s.on('error', () => resolve(false))
      })
      if (ok) break
      if (Date.now() > deadline || proc.exitCode !== null) throw new Error('nginx did not start:\n' + log + fs.readFileSync(path.join(dir, 'error.log'), 'utf8'))
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  return {
    urls,
    accessLog: () => fs.existsSync(path.join(dir, 'access.log')) ? fs.readFileSync(path.join(dir, 'access.log'), 'utf8').trim().split('\n') : [],
    stop: () => new Promise((resolve) => {
      proc.once('exit', () => { fs.rmSync(dir, { recursive: true, force: true }); resolve() })
      proc.kill('SIGQUIT')
    })
  }
}

module.exports = { startNginx, CONFIGS, freePort }
