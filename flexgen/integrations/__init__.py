"""Adapters to other people's frameworks (HELM, lm-evaluation-harness): thin layers that speak the
framework's own types and hand whole request lists to flexgen.requests."""
