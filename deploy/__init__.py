"""Operating a real federation: servers with authentication, one isolated worker per party.

`python -m deploy up` starts, on one machine, what a multi-organization federation runs on
several: a Prefect server (API auth on), an MLflow tracking server (database store, proxied
artifacts, basic auth), a work pool and a worker for the coordinator and for every client
organization, each worker confined to its own party's files. `docs/deployment.md` gives the
same steps for separate machines.
"""
