"""What tests share, imported as `support.<module>` (conftest.py files hold only fixtures):

- `jobs`: the repository's paths, example manifests and factories of jobs (tiny_pretrain, with_change);
- `processes`: the kubeforge CLI, free ports, bounded waits, child processes (stop_process, moto_server);
- `rbac`: the permissions the operator needs, and which requests of an operator run exceeded them;
- `e2e`: the operator run in a test against an API server, and the questions tests ask of a job;
- `prometheus`: a real Prometheus server and promtool.

bench/ imports these too (with tests/ on sys.path).
"""
