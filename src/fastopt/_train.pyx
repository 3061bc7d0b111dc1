# placeholder
include "_common.pxi"
