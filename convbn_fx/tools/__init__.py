"""Layer 7, tools: what users run around the library, never imported by `import convbn_fx`.

cli.py (`convbn-fx report` and `convbn-fx measure`), report.py, measure.py with steps.py,
tensor_peak.py (exact peaks), fake.py (estimates), fit.py (the largest batch that fits),
peak.py (a fresh process's peak), figures.py, measure_table.py, plot.py, progress.py and
meters.py, specs.py (SPEC → model), options.py (the states and formats both commands name)
and testing.py (the project's numerics standard as functions). Imports any layer below.
"""
