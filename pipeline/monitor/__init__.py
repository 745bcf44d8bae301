"""The feedback loop's reader: `streamscore monitor` joins the delayed fraud labels to the
scores that were served (`join`), keeps each model version's online quality over a sliding
window as counts (`quality`), and reports it as metrics and ModelQuality records
(`service`).
"""
