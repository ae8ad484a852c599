"""The send path: the outbox (claim, load, record), the one send service, dispatch, rate limit, retry policy, destination health."""
