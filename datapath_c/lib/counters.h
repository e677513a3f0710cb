/* counters.h - per-CPU packet and byte counters per (direction, reason). */
#ifndef CY_COUNTERS_H
#define CY_COUNTERS_H

static __always_inline void cy_count(__u8 dir, __u8 reason, __u32 len)
{
	__u32 idx = (__u32)dir * CY_REASON_MAX + reason;
	struct counter *c = cy_counters.lookup(&idx);

	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

#endif /* CY_COUNTERS_H */
