"""Red-team suite: published pickle-scanner and loader bypasses, tried against tmtguard at run time."""
