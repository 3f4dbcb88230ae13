"""Pictures of what `lucidlm.introspect` measures: PNG heatmaps and maps (matplotlib), and a
self-contained interactive HTML page of attention patterns.

Every image has a title and labelled axes, and a colour bar wherever colour carries a value.
Figures are drawn with matplotlib's object API (`Figure`, no pyplot), so nothing depends on
a display or on global plotting state.
"""
