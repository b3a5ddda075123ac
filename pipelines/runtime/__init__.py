"""Stage 1: what every process needs first: the config loader, joining the job (launch), every collective
(distributed), the rank watchdog and code versions. Imports nothing else of pipelines/."""
