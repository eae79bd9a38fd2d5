"""The measuring apparatus: benchmark runners, summaries, reports. It measures the product
(engine, transport, faces) and the product never imports it; the CLI only dispatches
`specsplit bench` and `specsplit bench-report` here."""
