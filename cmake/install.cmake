# `cmake --install` lays moert out as a CMake package: the static libraries under the
# moert:: namespace (moert::engine pulls in the rest), their headers under include/ with the
# repository's paths ("model/config.hpp") beside the embedder's <moert/engine.hpp>, the
# `moert` CLI in bin/, and moertConfig.cmake with the FindCAF.cmake it needs (Debian's CAF
# 0.17 ships no CMake config).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(MOERT_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/moert)
set(_moert_libraries moert_core moert_gpu_cpu moert_gpu moert_model moert_policy moert_transport moert_actors moert_engine)
if(TARGET moert_gpu_cuda)  # linked by moert_gpu when the CUDA backend is built
  list(INSERT _moert_libraries 2 moert_gpu_cuda)
endif()
if(TARGET moert_transport_nccl)  # linked by moert_actors (cluster transport nccl) with CUDA + NCCL
  list(APPEND _moert_libraries moert_transport_nccl)
endif()
foreach(_lib IN LISTS _moert_libraries)
  string(REPLACE "moert_" "" _name ${_lib})
  set_target_properties(${_lib} PROPERTIES EXPORT_NAME ${_name})
  add_library(moert::${_name} ALIAS ${_lib})  # the same names for add_subdirectory users
endforeach()

install(TARGETS ${_moert_libraries} EXPORT moertTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})  # include/ comes with moert::core
install(TARGETS moert RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY core gpu model policy transport actors engine
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  FILES_MATCHING PATTERN "*.hpp"
  PATTERN "engine/include" EXCLUDE)
# The embedder's header: #include <moert/engine.hpp> (moert's own types, no CAF, no kernels).
install(DIRECTORY engine/include/moert DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

install(EXPORT moertTargets NAMESPACE moert:: DESTINATION ${MOERT_INSTALL_CMAKEDIR})
configure_package_config_file(cmake/moertConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/moertConfig.cmake
  INSTALL_DESTINATION ${MOERT_INSTALL_CMAKEDIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/moertConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES
  ${CMAKE_CURRENT_BINARY_DIR}/moertConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/moertConfigVersion.cmake
  cmake/FindCAF.cmake
  DESTINATION ${MOERT_INSTALL_CMAKEDIR})
