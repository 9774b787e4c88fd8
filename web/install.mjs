// Copies niivue's self-contained ES module bundle (no imports, no eval) next to the page, where the
// server serves it as /web/niivue.js. The copy is git-ignored: it comes from the npm registry.
import { copyFileSync, mkdirSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const bundle = join(here, 'node_modules', '@niivue', 'niivue', 'dist', 'index.js')
const target = join(here, '..', 'MedPrunerSlicer', 'medpruner', 'server', 'web', 'vendor')
mkdirSync(target, { recursive: true })
copyFileSync(bundle, join(target, 'niivue.js'))
console.log(`niivue bundle -> ${join(target, 'niivue.js')}`)
