"""Shared plumbing for the numbered stage scripts: config, envs, artifact io, workers."""
