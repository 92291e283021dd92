"""Load testing of pagedserve through Redis: Locust user, sweep and report."""
