cdef class ReceiveWindow:
    cdef public long long window, credit, pending, epoch_consumed, debt
    cdef public object epoch_start
    cdef public double seen
