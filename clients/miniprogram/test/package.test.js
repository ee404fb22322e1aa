// The npm package: what `npm pack` ships, that the type declarations name every export, and
// that voxpoll.js stays ES5 syntax (uni-app / Taro builds and old mini-program base libraries
// take it without transpiling).
'use strict'

const test = require('node:test')
const assert = require('node:assert/strict')
const { execFileSync } = require('node:child_process')
const fs = require('node:fs')
const path = require('node:path')

const DIR = path.resolve(__dirname, '..')
const pkg = JSON.parse(fs.readFileSync(path.join(DIR, 'package.json'), 'utf8'))

test('npm pack ships the library, its types and its README', () => {
  const out = execFileSync('npm', ['pack', '--dry-run', '--json'], { cwd: DIR }).toString()
  const files = JSON.parse(out)[0].files.map((f) => f.path).sort()
  assert.deepEqual(files, ['README.md', 'package.json', 'voxpoll.d.ts', 'voxpoll.js'])
  assert.equal(pkg.main, 'voxpoll.js')
  assert.equal(pkg.types, 'voxpoll.d.ts')
  assert.match(pkg.version, /^\d+\.\d+\.\d+$/)
})

test('the declarations name every export and nothing else', () => {
  const api = require('../voxpoll')
  const dts = fs.readFileSync(path.join(DIR, 'voxpoll.d.ts'), 'utf8')
  const declared = [...dts.matchAll(/^export declare (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort()
  assert.deepEqual(declared, Object.keys(api).sort())
  // Every Session method the declarations promise exists.
  const session = dts.split('export declare class Session')[1].split('\n}')[0]
  for (const m of session.matchAll(/^ {2}(\w+)\(/gm)) {
    assert.equal(typeof api.Session.prototype[m[1]], 'function', m[1])
  }
  for (const m of ['open', 'record']) assert.equal(typeof api.VoxpollClient.prototype[m], 'function')
})

test('voxpoll.js has no syntax newer than ES5', () => {
  const src = fs.readFileSync(path.join(DIR, 'voxpoll.js'), 'utf8')
  // Comments, strings and regex-free code only: drop comments and string literals first.
  const code = src
    .replace(/\/\*[\s\S]*?\*\//g, '')
    .replace(/\/\/.*$/gm, '')
    .replace(/'(?:\\.|[^'\\])*'/g, "''")
  const newer = [
    [/=>/, 'arrow function'], [/\b(let|const)\s/, 'let/const'], [/\bclass\s+\w/, 'class'],
    [/`/, 'template literal'], [/\.\.\.\w/, 'spread/rest'], [/\basync\s+function|\bawait\s/, 'async/await'],
    [/\bfor\s*\([^)]*\bof\b/, 'for…of'], [/\bfunction\b[^(]*\([^)]*=/, 'default parameter']
  ]
  for (const [re, what] of newer) {
    const m = re.exec(code)
    assert.equal(m, null, `${what}: …${m && code.slice(Math.max(0, m.index - 40), m.index + 40)}…`)
  }
})
