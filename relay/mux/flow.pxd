cdef class ReceiveWindow:
    cdef public long long window, credit, pending, epoch_consumed, debt, total
    cdef public object epoch_start
    cdef public double seen
    # cpdef: called by the core (typed references) on every acknowledgement.
    cpdef consumed(self, n)
    cpdef epoch_test(self, n, now, rtt)
