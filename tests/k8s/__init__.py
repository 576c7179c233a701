"""Test infrastructure for the operator's end-to-end tests.

- `emulator`: a Kubernetes API server (kmock's KubernetesEmulator, made strict where a real one is),
  with its parts `resources`, `selectors`, `patching` and `admission` (schema and CEL rules);
- `kubelet`: the small async API client (`KubeClient`, from a URL or a kubeconfig) and the harness
  that plays the node for pods, running their `trainer` command as local processes;
- `cluster`: the pytest fixtures (`cluster`, `kubelet`) over the emulator or a real cluster.
"""
