"""The in-pod runtime: rendezvous, communicators and the packed weight broadcast."""
