// The C entry points of the host build, for ctypes (npsparseattn/cuda/emulate/host.py).
//
// Included last by the generated translation unit, after `npsa_entries` (one npsa_emu::Entry per
// kernel instance) is defined.
#pragma once

extern "C" {

__attribute__((visibility("default"))) int npsa_emu_count() {
  return static_cast<int>(sizeof(npsa_entries) / sizeof(npsa_entries[0]));
}

__attribute__((visibility("default"))) const char* npsa_emu_name(int i) { return npsa_entries[i].name; }

// The parameter types of instance i, one letter each: p pointer, i int, u unsigned, f float, l long long.
__attribute__((visibility("default"))) int npsa_emu_signature(int i, char* buf, int size) {
  const std::string s = npsa_entries[i].signature();
  std::snprintf(buf, static_cast<size_t>(size), "%s", s.c_str());
  return static_cast<int>(s.size());
}

// Launch instance `i` like cuLaunchKernel (args: pointers to the parameter values).  `ranges` holds
// nranges (start, end) byte addresses of the global buffers the kernel may touch; `schedule` holds
// npsa_emu::ScheduleFlags; `max_smem` is the device's limit of dynamic shared memory per block.
// Returns 0, or 1 with the reason in `err`.
__attribute__((visibility("default"))) int npsa_emu_launch(int i, const unsigned* grid, const unsigned* block,
                                                           unsigned smem, void** args,
                                                           const unsigned long long* ranges, int nranges,
                                                           int schedule, unsigned max_smem, char* err,
                                                           int errlen) {
  npsa_emu::Launch launch;
  launch.reverse = schedule & npsa_emu::REVERSE;
  launch.greedy = schedule & npsa_emu::GREEDY;
  launch.eager_copies = schedule & npsa_emu::EAGER_COPIES;
  launch.strict = !(schedule & npsa_emu::RELAXED);
  launch.reverse_blocks = schedule & npsa_emu::REVERSE_BLOCKS;
  launch.max_smem = max_smem;
  for (int r = 0; r < nranges; ++r)
    launch.ranges.push_back({static_cast<uintptr_t>(ranges[2 * r]), static_cast<uintptr_t>(ranges[2 * r + 1])});
  npsa_emu::L = &launch;
  const bool ok = npsa_entries[i].launch(grid, block, smem, args);
  npsa_emu::L = nullptr;
  if (!ok) std::snprintf(err, static_cast<size_t>(errlen), "%s", launch.error.c_str());
  return ok ? 0 : 1;
}
}
