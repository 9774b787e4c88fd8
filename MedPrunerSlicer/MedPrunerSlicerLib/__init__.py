"""Scene logic of the MedPrunerSlicer module: Qt-free, runs in Slicer and headless on `slicer-core`.

One job per module:

- `errors`        exceptions with a message (what happened) and a hint (what to do)
- `answer_view`   the Answer section's HTML: answer first, plain-words details, demo flag, research notice
- `nrrd_io`       NRRD bytes <-> numpy array + IJK-to-RAS matrix (pure Python + numpy, RAS <-> LPS)
- `volume_export` volume node -> checked snapshot -> NRRD bytes (only voxels and geometry leave)
- `settings`      server URL normalisation, local/remote rule, consent, the preference keys
- `client`        HTTP client of the medpruner server (urllib, short timeouts, one exception per error)
- `job_runner`    worker thread + queue: HTTP off the main thread, results drained by the caller's timer
- `colors`        colour tables: perceptual attention ramp (0 transparent), 5-class decision labels
- `result_nodes`  report + heatmaps -> MRML nodes in a subject-hierarchy folder; past results
- `display`       heatmaps over the input in the slice views, opacity, next/previous kept slice
- `conversation`  the questions asked about a volume (from the scene) and the prepared volume a follow-up reuses
- `ask`           one question end to end: snapshot, reuse or upload, worker, progress callbacks, nodes
- `support`       which Slicer versions can do what (5.8: remote server only; 5.10+: local server too)
- `installer`     the local server's packages installed in child processes, with progress and cancel
- `local_server`  "start a local server": requirements, command line, process tree start/stop, leftovers, log
- `scene_utils`   small MRML helpers (nodes by class, subject-hierarchy folders)
"""
