// The JS SDK (npm `e2b`, and `@e2b/code-interpreter`) against vmcache, unmodified: create,
// commands (output, a non-zero exit as CommandExitError, envs, user, background + kill),
// files (write, read, list, exists, remove), runCode with state kept, kill. Run by
// tests/test_e2b_js.py with NODE_PATH at the SDK's npm directory; prints one JSON line.
'use strict'
const { Sandbox, CommandExitError } = require('e2b')
const CodeInterpreter = require('@e2b/code-interpreter')

const seen = {}
const timings = {}

async function step(name, fn) {
  const started = performance.now()
  try {
    seen[name] = await fn()
  } catch (error) {
    seen[name] = { raised: error?.constructor?.name ?? String(error), message: String(error?.message ?? error).slice(0, 500) }
  } finally {
    timings[name] = Math.round(performance.now() - started) / 1000
  }
  return seen[name]
}

async function main() {
  let sbx
  await step('create', async () => {
    sbx = await Sandbox.create({ envs: { SANDBOX_WIDE: 'js' }, metadata: { suite: 'js' }, timeoutMs: 300_000 })
    return { sandboxId: sbx.sandboxId }
  })
  if (!sbx) return
  const run = (cmd, opts) => sbx.commands.run(cmd, opts)
  await step('run', async () => {
    const r = await run('echo hello; echo oops >&2')
    return { stdout: r.stdout, stderr: r.stderr, exitCode: r.exitCode }
  })
  await step('run_exit_nonzero', async () => {
    try {
      await run('echo partial; exit 4')
      return { raised: null }
    } catch (error) {
      return { raised: error.constructor.name, isCommandExitError: error instanceof CommandExitError,
               exitCode: error.exitCode, stdout: error.stdout }
    }
  })
  await step('run_envs_user', async () => ({
    envs: (await run('echo $FOO,$SANDBOX_WIDE', { envs: { FOO: 'bar' } })).stdout,
    user: (await run('whoami; echo $HOME')).stdout,
    root: (await run('whoami', { user: 'root' })).stdout,
    cwd: (await run('pwd', { cwd: '/tmp' })).stdout,
  }))
  await step('background_kill', async () => {
    const handle = await run('sleep 120', { background: true })
    const listed = (await sbx.commands.list()).some((p) => p.pid === handle.pid)
    const killed = await handle.kill()
    let waited
    try {
      waited = { exitCode: (await handle.wait()).exitCode }
    } catch (error) {
      waited = { raised: error.constructor.name, exitCode: error.exitCode }
    }
    return { listed, killed, waited }
  })
  await step('files', async () => {
    await sbx.files.write('/home/user/js/a.txt', 'from js')
    const text = await sbx.files.read('/home/user/js/a.txt')
    const bytes = new Uint8Array(256 * 1024).map((_, i) => (i * 7) % 251)
    await sbx.files.write('/home/user/js/b.bin', bytes.buffer)
    const back = await sbx.files.read('/home/user/js/b.bin', { format: 'bytes' })
    const same = back.length === bytes.length && back.every((v, i) => v === bytes[i])
    const names = (await sbx.files.list('/home/user/js')).map((e) => e.name).sort()
    const exists = await sbx.files.exists('/home/user/js/a.txt')
    await sbx.files.remove('/home/user/js/a.txt')
    return { text, same, names, exists, existsAfterRemove: await sbx.files.exists('/home/user/js/a.txt') }
  })
  await step('get_info', async () => {
    const info = await sbx.getInfo()
    return { sandboxId: info.sandboxId, metadata: info.metadata }
  })
  await step('kill', () => sbx.kill())
  await step('is_running_after_kill', () => sbx.isRunning())
  await step('kill_again', () => Sandbox.kill(sbx.sandboxId))

  let ci
  await step('code_create', async () => {
    ci = await CodeInterpreter.Sandbox.create()
    return { sandboxId: ci.sandboxId }
  })
  if (ci) {
    await step('run_code', async () => {
      await ci.runCode('x = 20')
      const e = await ci.runCode('print("js-out")\nx * 2 + 2')
      const err = await ci.runCode('raise ValueError("js-bad")')
      return { text: e.text, stdout: e.logs.stdout, error: err.error && { name: err.error.name, value: err.error.value } }
    })
    await step('code_kill', () => ci.kill())
  }
}

main().then(
  () => { console.log(JSON.stringify({ ...seen, _timings: timings })); process.exit(0) },
  (error) => { console.log(JSON.stringify({ fatal: String(error) })); process.exit(1) },
)
