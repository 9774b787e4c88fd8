// The web viewer: upload a volume, ask, watch the answer being written, inspect the pruning decisions.
import * as api from './api.js'
import { Viewer } from './viewer.js'

const $ = (id) => document.getElementById(id)
const SVG = 'http://www.w3.org/2000/svg'

// The volume the conversation is about: follow-ups name its volume_id instead of sending it again.
const conversation = { file: null, volumeId: null, settingsKey: null, report: null, turns: 0 }
let viewer = null
let job = null   // { id, abort: AbortController } while a question is in flight
let lastFailedAction = null

function showError (e) {
  if (e instanceof api.ServerDown) return serverDown(true)
  $('error').hidden = false
  $('error-message').textContent = e.message
  $('error-hint').textContent = e.hint || ''
  $('error').dataset.status = e.status || ''
}

function clearError () { $('error').hidden = true; $('error-message').textContent = ''; $('error-hint').textContent = '' }

function serverDown (down, text) {
  $('server-down').hidden = !down
  if (text) $('server-down-text').textContent = text
}

async function start () {
  wireControls()
  await connect()
}

/** Ask the server who it is; with a token required and none accepted yet, show only the token prompt. */
async function connect () {
  let info
  try {
    info = await api.health()
  } catch (e) {
    lastFailedAction = connect
    return serverDown(true, 'The server is not answering: it may have stopped or restarted.')
  }
  serverDown(false)
  // A local checkpoint folder is named by its folder (no server paths on screen); a hub id stays whole.
  const model = /^([/.~\\]|[A-Za-z]:\\)/.test(info.model_id) ? info.model_id.split(/[/\\]/).filter(Boolean).pop() : info.model_id
  $('model-line').textContent = `Model: ${model} (${info.device})`
  $('demo-flag').hidden = !info.demo_model
  if (info.auth && !(api.token.get() && await api.tokenAccepted())) {
    $('app').hidden = true
    $('token-dialog').hidden = false
    $('token-input').focus()
    return
  }
  $('token-dialog').hidden = true
  $('app').hidden = false
  if (!viewer) {   // once the views are laid out: niivue sizes its canvases from them
    viewer = new Viewer({ axial: $('view-axial'), coronal: $('view-coronal'), sagittal: $('view-sagittal') })
    await viewer.attach()
  }
  document.body.dataset.ready = '1'
}

function wireControls () {
  $('token-form').addEventListener('submit', async (ev) => {
    ev.preventDefault()
    api.token.set($('token-input').value.trim())
    $('token-input').value = ''
    try {
      if (!await api.tokenAccepted()) { api.token.clear(); $('token-error').hidden = false; return }
    } catch (e) { return serverDown(true) }
    $('token-error').hidden = true
    await connect()
  })
  $('retry').addEventListener('click', () => { serverDown(false); (lastFailedAction || connect)() })
  $('ask').addEventListener('click', () => ask())
  $('cancel').addEventListener('click', async () => {
    if (!job) return
    try { await api.cancel(job.id) } catch (e) { showError(e) }
  })
  $('volume-file').addEventListener('change', () => {
    // A new volume starts a new conversation: nothing said about the old one applies to it.
    Object.assign(conversation, { file: null, volumeId: null, settingsKey: null, report: null, turns: 0 })
    $('conversation').replaceChildren()
  })
  $('opacity').addEventListener('input', (e) => viewer.setOpacity('attention', Number(e.target.value)))
  $('label-opacity').addEventListener('input', (e) => viewer.setOpacity('labels', Number(e.target.value)))
  $('colormap').addEventListener('change', (e) => viewer.setColormap(e.target.value))
  $('prev-kept').addEventListener('click', () => stepKept(-1))
  $('next-kept').addEventListener('click', () => stepKept(1))
}

function params () {
  return {
    question: $('question').value,
    pruning: { enabled: $('pruning-enabled').checked, gamma: Number($('gamma').value), tau: Number($('tau').value) },
    compare: $('compare').checked
  }
}

// What a prepared volume depends on: a follow-up with other settings must send the volume again.
const settingsKey = (p) => JSON.stringify(p.pruning)

async function ask () {
  clearError()
  const file = $('volume-file').files[0] || null
  const p = params()
  if (!p.question.trim()) return showError({ message: 'Type a question first.' })
  const reuse = conversation.volumeId && conversation.file === file && conversation.settingsKey === settingsKey(p)
  if (!file && !reuse) return showError({ message: 'Choose a volume file first.' })
  setBusy(true)
  $('live').hidden = false
  $('live-question').textContent = p.question
  $('answer').textContent = ''
  try {
    let submitted
    try {
      submitted = await send(reuse ? null : file, reuse ? { ...p, volume_id: conversation.volumeId } : p)
    } catch (e) {
      // The server no longer holds the prepared volume (expired, restarted): send the file after all.
      if (!(reuse && e instanceof api.ApiError && ['unknown_volume', 'settings_mismatch'].includes(e.code))) throw e
      submitted = await send(file, p)
    }
    await followJob(submitted.job_id, p, file)
  } catch (e) {
    lastFailedAction = null
    showError(e)
  } finally {
    setBusy(false)
  }
}

async function send (file, p) {
  $('upload-label').hidden = !file
  $('upload-progress').value = 0
  try {
    return await api.submit(file, p, (f) => { $('upload-progress').value = f })
  } finally {
    $('upload-label').hidden = true
  }
}

function setBusy (busy) {
  $('ask').disabled = busy
  $('cancel').disabled = !busy
  $('job-progress').hidden = !busy
  if (!busy) job = null
}

async function followJob (jobId, p, file) {
  job = { id: jobId }
  document.body.dataset.jobId = jobId
  $('stage').textContent = 'Queued'
  const onEvent = (name, data) => {
    if (name === 'progress') {
      $('stage').textContent = `Stage: ${data.stage}`
      $('job-progress').value = data.progress
    } else if (name === 'token') {
      $('answer').textContent = data.text
    }
  }
  let final = null
  try {
    final = await api.follow(jobId, onEvent)
  } catch (e) {
    if (!(e instanceof api.ServerDown)) throw e
  }
  while (!final) {   // the stream broke or ended early: poll until the job has finished
    let s
    try {
      s = await api.status(jobId)
    } catch (e) {
      if (e instanceof api.ApiError && e.status === 404) {
        throw new api.ApiError(404, 'unknown_job', 'The server no longer knows this question: it was restarted.',
          'Ask again; the volume will be sent again.')
      }
      throw e
    }
    onEvent('token', { text: s.answer_so_far || '' })
    if (['done', 'failed', 'cancelled'].includes(s.state)) final = s
    else await new Promise((resolve) => setTimeout(resolve, 500))
  }
  $('answer').textContent = final.answer_so_far || ''
  if (final.state === 'failed') {
    const e = final.error || {}
    throw new api.ApiError(422, e.code, e.message || 'The question failed.', e.hint)
  }
  if (final.state === 'cancelled') {
    $('stage').textContent = 'Cancelled'
    return
  }
  $('stage').textContent = 'Done'
  await showResult(jobId, p, file)
}

async function showResult (jobId, p, file) {
  const report = await api.result(jobId)
  const sameVolume = conversation.volumeId && conversation.volumeId === report.volume_id && conversation.report
  if (!sameVolume) {
    // A follow-up about the volume on screen keeps its overlays: its decisions are the same ones.
    const [attention, kept] = await Promise.all([api.heatmap(jobId, 'attention'), api.heatmap(jobId, 'kept')])
    const readable = file && !/\.zip$/i.test(file.name)
    $('view-note').hidden = readable
    $('view-note').textContent = readable ? '' : 'The browser cannot read a DICOM series: the overlays are shown without the scan.'
    await viewer.show(readable ? await file.arrayBuffer() : null, file ? file.name : '', attention, kept, report.labels, {
      colormap: $('colormap').value, opacity: Number($('opacity').value), labelOpacity: Number($('label-opacity').value)
    })
    buildLabelToggles(report.labels)
    conversation.report = report
    // Start on the kept slice nearest the middle: the ends of a scan are rarely where the anatomy is.
    const keptSlices = report.slices.kept_voxel_indices
    const middle = (report.slices.total - 1) / 2
    if (keptSlices.length) goTo(keptSlices.reduce((a, b) => (Math.abs(b - middle) < Math.abs(a - middle) ? b : a)))
  }
  Object.assign(conversation, { file, volumeId: report.volume_id || null, settingsKey: settingsKey(p) })
  if (report.demo_model) $('demo-flag').hidden = false
  addTurn(report)
  drawChart(conversation.report)
  showCompare(report)
  $('live').hidden = true
  document.body.dataset.answered = String(++conversation.turns)
}

function addTurn (report) {
  const li = document.createElement('li')
  const q = document.createElement('p')
  q.className = 'q'
  q.textContent = report.question
  const a = document.createElement('p')
  a.className = 'a'
  a.textContent = report.answer
  const meta = document.createElement('p')
  meta.className = 'muted'
  const t = report.tokens || {}
  meta.textContent = `${report.slices.kept} of ${report.slices.sent} slices kept, ` +
    `${Math.round((t.retention || 0) * 1000) / 10}% of visual tokens` + (report.prefix_reused ? '; follow-up, volume not sent again' : '')
  li.append(q, a, meta)
  $('conversation').append(li)
}

function showCompare (report) {
  const unpruned = report.unpruned
  $('compare-view').hidden = !unpruned
  if (!unpruned) return
  $('compare-pruned').textContent = report.answer
  $('compare-pruned-stats').textContent = `${report.tokens.kept_visual} visual tokens, ${report.timings_s.total.toFixed(2)} s`
  $('compare-unpruned').textContent = unpruned.answer
  const total = unpruned.timings_s && unpruned.timings_s.total
  $('compare-unpruned-stats').textContent = `${report.tokens.total_visual} visual tokens` + (total ? `, ${total.toFixed(2)} s` : '')
}

function buildLabelToggles (labels) {
  const box = $('labels')
  box.querySelectorAll('label').forEach((l) => l.remove())
  for (const [value, { name, rgba }] of Object.entries(labels)) {
    if (Number(value) === 0) continue   // "not sent": transparent anyway
    const label = document.createElement('label')
    const input = document.createElement('input')
    input.type = 'checkbox'
    input.checked = true
    input.dataset.label = value
    input.addEventListener('change', () => viewer.setLabelVisible(Number(value), input.checked))
    const swatch = document.createElement('span')
    swatch.className = 'swatch'
    swatch.style.backgroundColor = `rgba(${rgba.slice(0, 3).map((c) => Math.round(c * 255)).join(',')},${rgba[3]})`
    label.append(input, ' ', swatch, ` ${name}`)
    box.append(label)
  }
}

let current = null   // voxel slice index the views show, along the report's slice axis

function goTo (voxelIndex) {
  const report = conversation.report
  current = voxelIndex
  viewer.goToSlice(report.input, voxelIndex)
  const entry = report.slices.per_slice.find((s) => s.voxel_index === voxelIndex)
  $('slice-info').textContent = entry
    ? `Slice ${voxelIndex}: ${entry.kept ? `kept, ${entry.tokens_kept} of ${entry.tokens_total} tokens` : 'dropped as a near-duplicate'}`
    : `Slice ${voxelIndex}: not sent to the model`
  $('slice-info').dataset.voxel = String(voxelIndex)
  $('slice-info').dataset.kept = entry && entry.kept ? '1' : '0'
  $('prev-kept').disabled = !neighbourKept(-1)
  $('next-kept').disabled = !neighbourKept(1)
  drawChart(report)
}

function neighbourKept (direction) {
  const kept = conversation.report.slices.kept_voxel_indices
  const candidates = kept.filter((k) => (direction > 0 ? k > current : k < current))
  if (!candidates.length) return null
  return direction > 0 ? Math.min(...candidates) : Math.max(...candidates)
}

function stepKept (direction) {
  const next = neighbourKept(direction)
  if (next !== null) goTo(next)
}

/** Bars of tokens kept per model slice; grey for dropped slices; a click shows that slice. */
function drawChart (report) {
  const svg = $('chart')
  svg.replaceChildren()
  if (!report) return
  const slices = report.slices.per_slice
  const max = Math.max(1, ...slices.map((s) => s.tokens_total || s.tokens_kept || 0))
  const width = 1000
  const height = 140
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`)
  svg.setAttribute('preserveAspectRatio', 'none')
  const w = width / slices.length
  slices.forEach((s, i) => {
    const dropped = !s.kept
    const h = dropped ? 4 : Math.max(2, (s.tokens_kept / max) * (height - 10))
    const rect = document.createElementNS(SVG, 'rect')
    rect.setAttribute('x', String(i * w + w * 0.1))
    rect.setAttribute('width', String(w * 0.8))
    rect.setAttribute('y', String(height - h))
    rect.setAttribute('height', String(h))
    rect.setAttribute('class', (dropped ? 'bar-dropped' : 'bar-kept') + (s.voxel_index === current ? ' bar-current' : ''))
    const title = document.createElementNS(SVG, 'title')
    title.textContent = `slice ${s.voxel_index}: ` + (dropped ? 'dropped' : `${s.tokens_kept} of ${s.tokens_total} tokens kept`)
    rect.append(title)
    rect.addEventListener('click', () => goTo(s.voxel_index))
    svg.append(rect)
  })
}

start().catch((e) => showError(e))
