"""Adapters to other people's frameworks (lm-evaluation-harness, HELM), thin, over flexgen.requests."""
