"""Debian's Chromium, headless, as Playwright drives it in the tests."""

CHROMIUM = "/usr/bin/chromium"
# as root, headless, on a machine with no way out: no sandbox, no background connections
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
