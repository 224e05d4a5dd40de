"""The reference agents: `phibroker worker --agent NAME` runs the `Agent` named NAME in `workers.NAME`.

webc researches a local corpus, dc writes requirements, vssc writes code, kalic audits it and cmdc runs
commands and deploys. They touch local files only, under a workspace folder (see `workers._common`).
"""
