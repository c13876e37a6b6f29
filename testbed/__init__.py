"""The real peers and the service's processes, as the tests and the benchmarks start them."""
