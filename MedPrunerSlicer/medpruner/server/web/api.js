// The page's side of the HTTP API (README "Server"): same origin, the token as a header, never in a URL.

const TOKEN_KEY = 'medpruner.token'

/** An API refusal or a failed job: the server's own message and hint, shown as they are. */
export class ApiError extends Error {
  constructor (status, code, message, hint) {
    super(message)
    this.status = status
    this.code = code
    this.hint = hint || ''
  }
}

/** The server did not answer at all (stopped, restarted, network gone). */
export class ServerDown extends Error {}

// sessionStorage only: the token dies with the tab and never reaches disk or another site.
export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY)
}

function authHeaders () {
  const value = token.get()
  return value ? { Authorization: `Bearer ${value}` } : {}
}

async function errorFrom (response) {
  try {
    const body = await response.json()
    const e = body.error || {}
    return new ApiError(response.status, e.code || 'http_error', e.message || response.statusText, e.hint)
  } catch {
    return new ApiError(response.status, 'http_error', `The server answered ${response.status}.`, '')
  }
}

/** GET/DELETE a JSON resource under /v1. */
export async function call (method, path) {
  let response
  try {
    response = await fetch(path, { method, headers: authHeaders(), cache: 'no-store' })
  } catch (e) {
    throw new ServerDown(String(e))
  }
  if (!response.ok) throw await errorFrom(response)
  return response
}

export const health = async () => (await call('GET', '/v1/health')).json()

/** True when the stored token is accepted: an unknown job is a 404 with it and a 401 without. */
export async function tokenAccepted () {
  try {
    await call('GET', '/v1/jobs/token-check')
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return true
    if (e instanceof ApiError && e.status === 401) return false
    throw e
  }
  return true
}

/**
 * POST /v1/jobs with XMLHttpRequest: fetch() cannot report upload progress.
 * `file` may be null for a follow-up (params.volume_id then names the prepared volume).
 */
export function submit (file, params, onUpload) {
  return new Promise((resolve, reject) => {
    const form = new FormData()
    form.append('params', JSON.stringify(params))
    if (file) form.append('volume', file, file.name)
    const xhr = new XMLHttpRequest()
    xhr.open('POST', '/v1/jobs')
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v)
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onUpload(e.loaded / e.total) }
    xhr.onerror = () => reject(new ServerDown('upload failed'))
    xhr.onload = () => {
      let body = null
      try { body = JSON.parse(xhr.responseText) } catch { }
      if (xhr.status === 202 && body) return resolve(body)
      const e = (body && body.error) || {}
      reject(new ApiError(xhr.status, e.code || 'http_error', e.message || `The server answered ${xhr.status}.`, e.hint))
    }
    xhr.send(form)
  })
}

/**
 * Follow a job's Server-Sent Events with fetch() (EventSource cannot send the Authorization header).
 * Calls onEvent(name, data) per event; resolves with the final status, or null when the stream ended
 * without one (the caller then polls).
 */
export async function follow (jobId, onEvent, signal) {
  const response = await call('GET', `/v1/jobs/${encodeURIComponent(jobId)}/events`)
  const reader = response.body.getReader()
  const decoder = new TextDecoder()
  let buffer = ''
  signal?.addEventListener('abort', () => reader.cancel())
  while (true) {
    let chunk
    try {
      chunk = await reader.read()
    } catch (e) {
      if (signal?.aborted) return null
      throw new ServerDown(String(e))
    }
    if (chunk.done) return null
    buffer += decoder.decode(chunk.value, { stream: true })
    let end
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end)
      buffer = buffer.slice(end + 2)
      let name = 'message'
      let data = ''
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim()
        else if (line.startsWith('data:')) data += line.slice(5).trim()
      }
      if (!data) continue   // a keep-alive comment
      const parsed = JSON.parse(data)
      onEvent(name, parsed)
      if (name === 'done' || name === 'failed' || name === 'cancelled') return parsed
    }
  }
}

export const status = async (jobId) => (await call('GET', `/v1/jobs/${encodeURIComponent(jobId)}`)).json()
export const result = async (jobId) => (await call('GET', `/v1/jobs/${encodeURIComponent(jobId)}/result`)).json()
export const heatmap = async (jobId, kind) =>
  (await call('GET', `/v1/jobs/${encodeURIComponent(jobId)}/heatmaps/${kind}`)).arrayBuffer()
export const cancel = (jobId) => call('DELETE', `/v1/jobs/${encodeURIComponent(jobId)}`)
