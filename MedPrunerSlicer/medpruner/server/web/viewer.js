// Axial, coronal and sagittal views of the input with the two heatmaps over it, drawn by niivue.
// One niivue instance per view (each with its own canvas) so every view is a plain element the user,
// and a test, can look at; their crosshairs are kept together with niivue's own broadcastTo.
import { Niivue } from './niivue.js'

const SLICE_TYPES = { axial: 0, coronal: 1, sagittal: 2 }   // niivue's SLICE_TYPE values
const INPUT = 0
const ATTENTION = 1
const KEPT = 2

export class Viewer {
  constructor (canvases) {
    this.views = Object.entries(canvases).map(([name, canvas]) => {
      const nv = new Niivue({
        // Radiological convention: the patient's left is on the screen's right, letters say so.
        isRadiologicalConvention: true,
        isOrientationTextVisible: true,
        dragAndDropEnabled: false,
        show3Dcrosshair: false,
        isColorbar: false,
        backColor: [0, 0, 0, 1],
        crosshairColor: [0.2, 0.9, 0.2, 0.6],
        // The decisions are per token: blending neighbours would invent values no token had.
        isNearestInterpolation: true,
        loadingText: ''
      })
      return { name, nv, canvas }
    })
    this.labelLut = null
    this.hiddenLabels = new Set()
  }

  async attach () {
    for (const v of this.views) {
      await v.nv.attachToCanvas(v.canvas)
      v.nv.setSliceType(SLICE_TYPES[v.name])
    }
    const all = this.views.map((v) => v.nv)
    for (const nv of all) nv.broadcastTo(all.filter((o) => o !== nv), { '2d': true, '3d': true })
  }

  /**
   * Show `input` (the uploaded file's bytes; null for a DICOM zip the browser cannot read) with the
   * attention heatmap and the kept labelmap (both NRRD bytes in the input's geometry) over it.
   */
  async show (input, inputName, attention, kept, labels, settings) {
    const urls = []
    const blobUrl = (bytes) => { const u = URL.createObjectURL(new Blob([bytes])); urls.push(u); return u }
    this.labelLut = lutFromReport(labels)
    try {
      for (const { nv } of this.views) {
        const list = [
          // Without the scan, the labelmap gives the geometry and stays invisible underneath.
          input ? { url: blobUrl(input), name: inputName } : { url: blobUrl(kept), name: 'geometry.nrrd', opacity: 0 },
          { url: blobUrl(attention), name: 'attention.nrrd', colormap: settings.colormap, opacity: settings.opacity },
          { url: blobUrl(kept), name: 'kept.nrrd', opacity: settings.labelOpacity }
        ]
        await nv.loadVolumes(list)
        const att = nv.volumes[ATTENTION]
        // Zero means "never seen" (dropped slice, not sent): below cal_min, so transparent.
        att.cal_min = Math.max(att.robust_max || att.global_max || 1, 1e-12) * 1e-6
        att.cal_max = att.global_max > 0 ? att.global_max : 1
        nv.volumes[KEPT].setColormapLabel(this.visibleLut())
        nv.updateGLVolume()
      }
    } finally {
      for (const u of urls) URL.revokeObjectURL(u)
    }
  }

  visibleLut () {
    const lut = structuredClone(this.labelLut)
    for (const value of this.hiddenLabels) lut.A[lut.I.indexOf(value)] = 0
    return lut
  }

  setLabelVisible (value, visible) {
    if (visible) this.hiddenLabels.delete(value); else this.hiddenLabels.add(value)
    this.forLoaded((nv) => { nv.volumes[KEPT].setColormapLabel(this.visibleLut()); nv.updateGLVolume() })
  }

  setOpacity (layer, value) {
    this.forLoaded((nv) => nv.setOpacity(layer === 'labels' ? KEPT : ATTENTION, value))
  }

  setColormap (name) {
    this.forLoaded((nv) => { nv.volumes[ATTENTION].colormap = name; nv.updateGLVolume() })
  }

  forLoaded (fn) {
    for (const { nv } of this.views) if (nv.volumes.length === 3) fn(nv)
  }

  /** Put the crosshair on voxel slice `index` along the report's slice axis (through the volume's centre). */
  goToSlice (geometry, index) {
    const ijk = geometry.size.map((n) => (n - 1) / 2)
    ijk['IJK'.indexOf(geometry.slice_axis_ijk)] = index   // the report names the axis by letter
    const lps = [0, 1, 2].map((r) => geometry.origin[r] +
      [0, 1, 2].reduce((sum, c) => sum + geometry.direction[r * 3 + c] * geometry.spacing[c] * ijk[c], 0))
    const ras = [-lps[0], -lps[1], lps[2]]   // niivue works in RAS millimetres
    for (const { nv } of this.views) {
      if (!nv.volumes.length) continue
      nv.scene.crosshairPos = nv.mm2frac(ras)
      nv.drawScene()
    }
  }
}

/** The report's label colours (RGBA 0-1) as a niivue label lookup table. */
function lutFromReport (labels) {
  const lut = { R: [], G: [], B: [], A: [], I: [], labels: [] }
  for (const [value, { name, rgba }] of Object.entries(labels).sort((a, b) => a[0] - b[0])) {
    lut.I.push(Number(value))
    lut.R.push(Math.round(rgba[0] * 255))
    lut.G.push(Math.round(rgba[1] * 255))
    lut.B.push(Math.round(rgba[2] * 255))
    lut.A.push(Math.round(rgba[3] * 255))
    lut.labels.push(name)
  }
  return lut
}
