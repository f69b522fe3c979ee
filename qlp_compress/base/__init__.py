"""Base: errors, atomic file I/O, output folders written as a set, interrupts, option checks, the stderr
console, machine facts. Every other part may use it.

May import: nothing else in the package."""
